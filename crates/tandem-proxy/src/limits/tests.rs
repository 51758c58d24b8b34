use super::*;
use tandem_config::{Priority, TenantLimits};

fn tenant(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u32>) -> Arc<Tenant> {
    Arc::new(Tenant {
        name: "t".into(),
        priority: Priority::Default,
        weight: 1,
        limits: TenantLimits {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            max_concurrent_requests: conc,
        },
        group: None,
    })
}

fn limiter() -> Arc<Limiter> {
    Arc::new(Limiter::new(&LimitsConfig::default(), Arc::new(Metrics::new(None, true))).unwrap())
}

fn rejected(l: &Limiter, reason: &'static str) -> u64 {
    l.metrics
        .access
        .limits_rejected
        .get_or_create(&LimitLabels {
            tenant: "t".into(),
            reason,
        })
        .get()
}

#[tokio::test(start_paused = true)]
async fn requests_past_the_budget_get_headers_and_a_retry_after() {
    let l = limiter();
    let t = tenant(Some(2), Some(100), None);
    let (_, h) = l.admit(&t, 10).await.unwrap();
    assert_eq!(
        h.requests,
        Some(RateDim {
            limit: 2,
            remaining: 1,
            reset_ms: 30_000
        })
    );
    assert_eq!(
        h.tokens,
        Some(RateDim {
            limit: 100,
            remaining: 90,
            reset_ms: 6_000
        })
    );
    l.admit(&t, 10).await.unwrap();
    let e = l.admit(&t, 10).await.unwrap_err();
    assert_eq!(e.reason, Reason::Requests);
    // One request back in 30 s (2 a minute), from the first admission's time.
    assert_eq!(e.retry_after, Some(30));
    assert_eq!(e.headers.requests.unwrap().remaining, 0);
    assert!(e.message.contains("2 requests per minute"), "{}", e.message);
    assert_eq!(rejected(&l, "requests"), 1);
    tokio::time::advance(std::time::Duration::from_secs(30)).await;
    assert!(l.admit(&t, 10).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn output_tokens_count_against_the_next_request_and_settling_gives_back() {
    let l = limiter();
    let t = tenant(None, Some(100), None);
    let (p, _) = l.admit(&t, 50).await.unwrap();
    p.charge(60);
    let e = l.admit(&t, 1).await.unwrap_err();
    assert_eq!(e.reason, Reason::Tokens);
    // At -10 with 100 a minute, 1 token is 6.6 s away.
    assert_eq!(e.retry_after, Some(7));
    p.charge(-60);
    assert!(l.admit(&t, 40).await.is_ok());
}

#[tokio::test]
async fn a_prompt_larger_than_the_minute_is_refused_for_good() {
    let l = limiter();
    let e = l
        .admit(&tenant(None, Some(100), None), 101)
        .await
        .unwrap_err();
    assert_eq!((e.reason, e.retry_after), (Reason::TooLarge, None));
    assert_eq!(rejected(&l, "too_large"), 1);
}

#[tokio::test]
async fn in_flight_slots_are_freed_with_the_last_clone_of_a_permit() {
    let l = limiter();
    let t = tenant(None, None, Some(1));
    let (p, h) = l.admit(&t, 1).await.unwrap();
    assert_eq!(h, RateHeaders::default());
    let e = l.admit(&t, 1).await.unwrap_err();
    assert_eq!(e.reason, Reason::Concurrency);
    let q = p.clone();
    drop(p);
    assert!(l.admit(&t, 1).await.is_err());
    drop(q);
    assert!(l.admit(&t, 1).await.is_ok());
}

#[tokio::test]
async fn a_refusal_on_rate_frees_the_slot_it_took() {
    let l = limiter();
    let t = tenant(Some(1), None, Some(5));
    let (_held, _) = l.admit(&t, 1).await.unwrap();
    for _ in 0..10 {
        assert_eq!(l.admit(&t, 1).await.unwrap_err().reason, Reason::Requests);
    }
    assert_eq!(l.local.state("t").inflight(), 1);
}

#[test]
fn reset_times_are_spelled_as_openai_does() {
    assert_eq!(reset_str(0), "0ms");
    assert_eq!(reset_str(120), "120ms");
    assert_eq!(reset_str(1_000), "1s");
    assert_eq!(reset_str(1_500), "1.5s");
    assert_eq!(reset_str(360_000), "6m0s");
    assert_eq!(reset_str(90_250), "1m30.25s");
}
