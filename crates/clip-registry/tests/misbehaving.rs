//! The client against a fake registry that misbehaves in ways a real one will not: it must
//! return exactly the right bytes or a typed error, never wrong bytes.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clip_registry::{Client, ClientConfig, Credentials, Error, Reference, RetryPolicy};
use clip_testkit::{FakeRegistry, FakeRequest, FakeResponse};

fn client() -> Client {
    Client::new(ClientConfig {
        credentials: vec![(
            "*".into(),
            Credentials::Basic {
                username: "u".into(),
                password: "secret".into(),
            },
        )],
        retry: RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            deadline: Duration::from_secs(5),
        },
        ..ClientConfig::default()
    })
    .unwrap()
}

fn blob() -> (Vec<u8>, clip_format::Digest) {
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let digest = clip_format::Digest::sha256(&data);
    (data, digest)
}

fn parse_range(req: &FakeRequest) -> (usize, usize) {
    let r = req.header("range").unwrap().trim_start_matches("bytes=");
    let (a, b) = r.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse::<usize>().unwrap() + 1)
}

#[test]
fn a_200_instead_of_206_still_yields_exactly_the_range() {
    let (data, digest) = blob();
    let d = data.clone();
    let fake = FakeRegistry::start(move |_| FakeResponse::new(200, d.clone())).unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let got = clip_testkit::runtime()
        .block_on(client().read_range(&r, &digest, 5000..9000))
        .unwrap();
    assert_eq!(&got[..], &data[5000..9000]);
}

#[test]
fn a_bogus_content_range_or_a_short_body_is_an_error_not_wrong_bytes() {
    let (data, digest) = blob();
    let d = data.clone();
    let fake = FakeRegistry::start(move |req| {
        let (a, b) = parse_range(req);
        // Off by 1000: the server sends the wrong window and says so.
        FakeResponse::new(206, d[a + 1000..b + 1000].to_vec()).header(
            "Content-Range",
            &format!("bytes {}-{}/{}", a + 1000, b + 999, d.len()),
        )
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let err = clip_testkit::runtime()
        .block_on(client().read_range(&r, &digest, 0..100))
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");

    let d = data.clone();
    let fake = FakeRegistry::start(move |req| {
        let (a, b) = parse_range(req);
        let mut resp = FakeResponse::new(206, d[a..b].to_vec())
            .header("Content-Range", &format!("bytes {a}-{}/{}", b - 1, d.len()));
        resp.truncate_to = Some((b - a) / 2);
        resp
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let err = clip_testkit::runtime()
        .block_on(client().read_range(&r, &digest, 0..10_000))
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol { .. } | Error::Unreachable { .. }),
        "{err}"
    );
}

#[test]
fn wrong_digests_and_huge_documents_are_refused() {
    let (data, digest) = blob();
    let mut tampered = data.clone();
    tampered[7] ^= 1;
    let fake = FakeRegistry::start(move |req| {
        if req.path.contains("/manifests/") {
            FakeResponse::new(200, vec![b' '; 64])
                .header("Content-Length", &(64u64 << 20).to_string())
        } else {
            FakeResponse::new(200, tampered.clone())
        }
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let rt = clip_testkit::runtime();
    let err = rt
        .block_on(client().blob_bytes(&r, &digest, 1 << 20))
        .unwrap_err();
    assert!(matches!(err, Error::Digest { .. }), "{err}");
    let err = rt.block_on(client().resolve(&r, None)).unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[test]
fn server_errors_and_429_are_retried_then_succeed() {
    let (data, digest) = blob();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let d = data.clone();
    let fake = FakeRegistry::start(move |req| match c2.fetch_add(1, Ordering::SeqCst) {
        0 => FakeResponse::new(503, "busy"),
        1 => FakeResponse::new(429, "slow down").header("Retry-After", "0"),
        _ => {
            let (a, b) = parse_range(req);
            FakeResponse::new(206, d[a..b].to_vec())
                .header("Content-Range", &format!("bytes {a}-{}/{}", b - 1, d.len()))
        }
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let got = clip_testkit::runtime()
        .block_on(client().read_range(&r, &digest, 10..20))
        .unwrap();
    assert_eq!(&got[..], &data[10..20]);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    // A registry that never recovers: a clear error after the attempts.
    let fake = FakeRegistry::start(|_| FakeResponse::new(500, "down")).unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let err = clip_testkit::runtime()
        .block_on(client().read_range(&r, &digest, 10..20))
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("500 Internal Server Error after 4 attempts"),
        "{err}"
    );
}

#[test]
fn redirects_to_object_storage_do_not_carry_credentials() {
    let (data, digest) = blob();
    let d = data.clone();
    let storage = FakeRegistry::start(move |req| {
        let (a, b) = parse_range(req);
        FakeResponse::new(206, d[a..b].to_vec())
            .header("Content-Range", &format!("bytes {a}-{}/{}", b - 1, d.len()))
    })
    .unwrap();
    let target = format!(
        "http://localhost:{}/bucket/blob",
        storage.host().rsplit_once(':').unwrap().1
    );
    let front = FakeRegistry::start(move |req| {
        if req.header("authorization").is_none() {
            FakeResponse::new(401, "").header("WWW-Authenticate", "Basic realm=\"fake\"")
        } else {
            FakeResponse::new(307, "").header("Location", &target)
        }
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", front.host())).unwrap();
    let rt = clip_testkit::runtime();
    let c = client();
    let got = rt.block_on(c.read_range(&r, &digest, 100..200)).unwrap();
    assert_eq!(&got[..], &data[100..200]);
    assert!(
        front
            .requests()
            .iter()
            .any(|q| q.header("authorization").is_some()),
        "the registry got credentials"
    );
    // The redirect target is cached: later reads of the blob go straight to storage.
    let front_before = front.requests().len();
    for i in 1..5usize {
        let got = rt
            .block_on(c.read_range(&r, &digest, (i * 1000) as u64..(i * 1000 + 10) as u64))
            .unwrap();
        assert_eq!(&got[..], &data[i * 1000..i * 1000 + 10]);
    }
    assert_eq!(
        front.requests().len(),
        front_before,
        "cached redirect: the registry is not asked again"
    );
    let seen = storage.requests();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(|q| q.header("authorization").is_none()),
        "credentials leaked to the redirect target: {seen:?}"
    );
}

#[test]
fn slow_responses_time_out_with_a_clear_error() {
    let (_, digest) = blob();
    let fake = FakeRegistry::start(|_| {
        std::thread::sleep(Duration::from_secs(3));
        FakeResponse::new(200, "late")
    })
    .unwrap();
    let c = Client::new(ClientConfig {
        timeout: Some(Duration::from_millis(300)),
        retry: RetryPolicy {
            attempts: 2,
            base: Duration::from_millis(10),
            max_delay: Duration::from_millis(20),
            deadline: Duration::from_secs(2),
        },
        ..ClientConfig::default()
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    let start = std::time::Instant::now();
    let err = clip_testkit::runtime()
        .block_on(c.read_range(&r, &digest, 0..10))
        .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "gave up within the retry budget"
    );
}

#[test]
fn requests_to_one_host_are_limited() {
    use std::sync::atomic::AtomicUsize;
    let (data, digest) = blob();
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n2, p2, d) = (Arc::clone(&now), Arc::clone(&peak), data.clone());
    let fake = FakeRegistry::start(move |req| {
        let cur = n2.fetch_add(1, Ordering::SeqCst) + 1;
        p2.fetch_max(cur, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        n2.fetch_sub(1, Ordering::SeqCst);
        let (a, b) = parse_range(req);
        FakeResponse::new(206, d[a..b].to_vec())
            .header("Content-Range", &format!("bytes {a}-{}/{}", b - 1, d.len()))
    })
    .unwrap();
    let c = Client::new(ClientConfig {
        max_per_host: Some(3),
        ..ClientConfig::default()
    })
    .unwrap();
    let r = Reference::parse(&format!("{}/x/y:t", fake.host())).unwrap();
    clip_testkit::runtime().block_on(async {
        let reads = (0..12u64).map(|i| {
            let (c, r, digest) = (c.clone(), r.clone(), digest.clone());
            tokio::spawn(async move { c.read_range(&r, &digest, i * 100..i * 100 + 50).await })
        });
        for (i, h) in reads.enumerate() {
            let got = h.await.unwrap().unwrap();
            assert_eq!(&got[..], &data[i * 100..i * 100 + 50]);
        }
    });
    let peak = peak.load(Ordering::SeqCst);
    assert!((1..=3).contains(&peak), "peak concurrency {peak}");
}
