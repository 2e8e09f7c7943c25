//! Waiting on what the relay exposes (gauges on `/metrics`), with a bound
//! of the test's choosing when the feature under test promises one.

use std::future::Future;
use std::time::Duration;

/// The value of the unlabelled series `name` in a Prometheus exposition.
pub fn series(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The sum of the series of `name` whose labels include each of `labels`
/// (`key="value"`) in a Prometheus exposition; 0 if there is none.
pub fn labelled_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{')?.split_once('}'))
        .filter(|(set, _)| labels.iter().all(|want| set.split(',').any(|l| l == *want)))
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}

/// Scrapes `<base>/metrics` and reads `name`; `None` if the scrape fails
/// or the series is absent.
pub async fn gauge(http: &reqwest::Client, base: &str, name: &str) -> Option<f64> {
    let resp = http.get(format!("{base}/metrics")).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    series(&resp.text().await.ok()?, name)
}

/// Retries `attempt` every 20 ms until it yields `Some`; panics naming
/// `what` once `limit` has passed.
pub async fn within<T, F, Fut>(limit: Duration, what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let waited = tokio::time::timeout(limit, async {
        loop {
            if let Some(v) = attempt().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    match waited {
        Ok(v) => v,
        Err(_) => panic!("not within {limit:?}: {what}"),
    }
}

/// Waits (at most `limit`) until the gauge `name` at `base` reads `want`.
pub async fn wait_gauge(
    http: &reqwest::Client,
    base: &str,
    name: &str,
    want: f64,
    limit: Duration,
) {
    let what = format!("{name} = {want} at {base}/metrics");
    within(limit, &what, || async {
        (gauge(http, base, name).await == Some(want)).then_some(())
    })
    .await
}

/// Waits until a GET of `url` answers 200 (e.g. once freed capacity is
/// back), within the test timeout.
pub async fn until_ok(http: &reqwest::Client, url: &str) {
    super::eventually(|| async {
        let r = http.get(url).send().await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await
}
