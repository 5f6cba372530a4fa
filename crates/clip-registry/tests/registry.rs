//! The registry client against the real distribution registry in every auth/transport mode.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clip_registry::{Client, ClientConfig, Credentials, Error, Reference, RetryPolicy};
use clip_testkit::image::{Entry, Image, Layer, random_bytes};
use clip_testkit::{Auth, ImageBuilder, ManifestFormat, Registry, RegistryOptions};

fn image() -> ImageBuilder {
    let img = Image::new(vec![Layer::new(vec![
        Entry::file("data.bin", random_bytes(1, 300_000)),
        Entry::file("etc/hello", "hi\n"),
    ])]);
    ImageBuilder::new(ManifestFormat::Oci).image(img)
}

fn client_for(reg: &Registry, creds: Option<(&str, &str)>) -> Client {
    let credentials = creds
        .map(|(u, p)| {
            vec![(
                reg.host(),
                Credentials::Basic {
                    username: u.into(),
                    password: p.into(),
                },
            )]
        })
        .unwrap_or_default();
    Client::new(ClientConfig {
        credentials,
        ca_pem: reg.ca().map(|c| c.cert_pem().to_owned()),
        insecure: Vec::new(),
        timeout: Some(Duration::from_secs(20)),
        retry: RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            deadline: Duration::from_secs(5),
        },
        docker_config: None,
        max_per_host: None,
        ..ClientConfig::default()
    })
    .unwrap()
}

/// A client that reads trust only from `certs_dirs` (nothing from the configuration).
fn certs_d_client(certs_dirs: Vec<std::path::PathBuf>) -> Client {
    Client::new(ClientConfig {
        certs_dirs: Some(certs_dirs),
        retry: RetryPolicy {
            attempts: 2,
            base: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            deadline: Duration::from_secs(5),
        },
        ..ClientConfig::default()
    })
    .unwrap()
}

/// A testkit digest string as a typed digest.
fn dg(s: &str) -> clip_format::Digest {
    clip_format::Digest::parse(s).unwrap()
}

#[test]
fn resolves_and_reads_exact_ranges_anonymously() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start_anonymous().unwrap();
    let built = image().build().unwrap();
    reg.push(&built, "tk/app", "v1").unwrap();
    let c = client_for(&reg, None);
    let r = Reference::parse(&format!("{}/tk/app:v1", reg.host())).unwrap();
    let img = rt.block_on(c.resolve(&r, None)).unwrap();
    assert_eq!(img.manifest_digest.as_str(), built.digest());
    assert_eq!(img.reference.digest.as_deref(), Some(built.digest()));
    assert_eq!(
        img.config.rootfs().diff_ids()[0],
        built.manifests[0].layers[0].diff_id
    );
    let blob = &built.manifests[0].layers[0].blob;
    for (a, b) in [
        (0u64, 1u64),
        (0, 512),
        (1000, 70_000),
        (blob.bytes.len() as u64 - 10, blob.bytes.len() as u64),
    ] {
        let got = rt
            .block_on(c.read_range(&img.reference, &dg(&blob.digest), a..b))
            .unwrap();
        assert_eq!(&got[..], &blob.bytes[a as usize..b as usize], "{a}..{b}");
    }
    let err = rt
        .block_on(c.read_range(&img.reference, &dg(&blob.digest), 10_000_000..10_000_010))
        .unwrap_err();
    assert!(matches!(err, Error::Protocol { .. }), "{err}");
    let err = rt
        .block_on(c.resolve(
            &Reference::parse(&format!("{}/tk/app:nope", reg.host())).unwrap(),
            None,
        ))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("manifest nope not found in tk/app on {}", reg.host())
    );
}

/// Many first requests at once to a plain-HTTP loopback registry: every one of them must fall
/// back from its HTTPS probe, even when another request learned "plain HTTP" first.
#[test]
fn concurrent_first_contacts_all_find_plain_http() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start_anonymous().unwrap();
    let built = image().build().unwrap();
    reg.push(&built, "tk/app", "v1").unwrap();
    let blob = built.manifests[0].layers[0].blob.clone();
    let r = Reference::parse(&format!("{}/tk/app@{}", reg.host(), built.digest())).unwrap();
    for _ in 0..5 {
        let c = client_for(&reg, None);
        let reads = (0..32u64).map(|i| {
            let (c, r, d) = (c.clone(), r.clone(), dg(&blob.digest));
            async move { c.read_range(&r, &d, i * 100..i * 100 + 50).await }
        });
        let results = rt.block_on(futures_util::future::join_all(reads));
        for (i, got) in results.into_iter().enumerate() {
            assert_eq!(&got.unwrap()[..], &blob.bytes[i * 100..i * 100 + 50]);
        }
    }
}

#[test]
fn basic_auth_good_wrong_and_missing_credentials() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Basic {
            username: "alice".into(),
            password: "pw".into(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    reg.push(&image().build().unwrap(), "tk/private", "v1")
        .unwrap();
    let r = Reference::parse(&format!("{}/tk/private:v1", reg.host())).unwrap();
    rt.block_on(client_for(&reg, Some(("alice", "pw"))).resolve(&r, None))
        .unwrap();
    for c in [
        client_for(&reg, Some(("alice", "wrong"))),
        client_for(&reg, None),
    ] {
        let err = rt.block_on(c.resolve(&r, None)).unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "unauthorized for tk/private on {0}: run `docker login {0}` or configure credentials for it (imageService.registries, --creds)",
                reg.host()
            )
        );
    }
}

#[test]
fn short_lived_tokens_never_fail_a_long_series_of_reads() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Token {
            users: vec![("bob".into(), "pw".into())],
            anonymous_pull: false,
            lifetime: Duration::from_secs(3),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    let built = image().build().unwrap();
    reg.push(&built, "tk/tok", "v1").unwrap();
    let issued_before = reg.token_stats().unwrap().get_tokens.load(Ordering::SeqCst);
    let c = client_for(&reg, Some(("bob", "pw")));
    let r = Reference::parse(&format!("{}/tk/tok:v1", reg.host())).unwrap();
    let img = rt.block_on(c.resolve(&r, None)).unwrap();
    let blob = &built.manifests[0].layers[0].blob;
    let start = Instant::now();
    let mut reads = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let a = (reads * 7919) % (blob.bytes.len() - 4096);
        let got = rt
            .block_on(c.read_range(&img.reference, &dg(&blob.digest), a as u64..a as u64 + 4096))
            .unwrap();
        assert_eq!(&got[..], &blob.bytes[a..a + 4096]);
        reads += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let issued = reg.token_stats().unwrap().get_tokens.load(Ordering::SeqCst) - issued_before;
    assert!(reads > 100, "{reads} reads");
    assert!(
        issued >= 3,
        "tokens must be refreshed across an 8 s run of 3 s tokens (issued {issued})"
    );
    // Without credentials the token server grants nothing: a clear error.
    let err = rt
        .block_on(client_for(&reg, None).resolve(&r, None))
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
}

#[test]
fn tls_registries_are_trusted_through_the_configured_ca_only() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Anonymous,
        tls: true,
        ..Default::default()
    })
    .unwrap();
    let built = image().build().unwrap();
    reg.push(&built, "tk/tls", "v1").unwrap();
    // Reached through a tap that sees whether each connection starts with TLS.
    let tap = clip_testkit::Tap::start(reg.addr()).unwrap();
    let r = Reference::parse(&format!("{}/tk/tls:v1", tap.host())).unwrap();
    // With the CA: HTTPS works, even on loopback.
    let img = rt
        .block_on(client_for(&reg, None).resolve(&r, None))
        .unwrap();
    assert_eq!(img.manifest_digest.as_str(), built.digest());
    // Without it: the certificate error is reported, never ignored.
    let c = Client::new(ClientConfig {
        retry: RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        },
        ..ClientConfig::default()
    })
    .unwrap();
    let err = rt.block_on(c.resolve(&r, None)).unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // The certificate error is final: no retry over plain HTTP to the TLS port, ever.
    assert!(tap.tls_connections() >= 2);
    assert_eq!(tap.plain_connections(), Vec::<String>::new());
}

/// A registry behind a private CA, trusted only through a certs.d directory
/// (`HOST:PORT/ca.crt`), and one that also demands a client certificate
/// (`HOST:PORT/client.cert` + `client.key`): resolved and read with nothing else configured.
/// Missing or wrong material fails as a TLS error, never as a plain-HTTP retry.
#[test]
fn certs_d_gives_per_registry_trust_and_client_certificates() {
    let rt = clip_testkit::runtime();
    for client_certs in [false, true] {
        let reg = Registry::start(RegistryOptions {
            tls: true,
            client_certs,
            ..Default::default()
        })
        .unwrap();
        let built = image().build().unwrap();
        reg.push(&built, "tk/certsd", "v1").unwrap();
        let tap = clip_testkit::Tap::start(reg.addr()).unwrap();
        let r = Reference::parse(&format!("{}/tk/certsd:v1", tap.host())).unwrap();
        let layer = dg(&built.manifests[0].layers[0].blob.digest);

        let roots = tempfile::tempdir().unwrap();
        let (empty, docker) = (roots.path().join("containers"), roots.path().join("docker"));
        std::fs::create_dir_all(&empty).unwrap();
        let dir = reg.write_certs_d_as(&docker, &tap.host()).unwrap();
        // Both conventional roots are read: the material sits in the second.
        let c = certs_d_client(vec![empty.clone(), docker.clone()]);
        let img = rt.block_on(c.resolve(&r, None)).unwrap();
        assert_eq!(img.manifest_digest.as_str(), built.digest());
        let head = rt
            .block_on(c.read_range(&img.reference, &layer, 0..64))
            .unwrap();
        assert_eq!(head.len(), 64);

        // The CA under another host's directory does not count.
        let elsewhere = roots.path().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("127.0.0.1:1")).unwrap();
        std::fs::copy(dir.join("ca.crt"), elsewhere.join("127.0.0.1:1/ca.crt")).unwrap();
        let err = rt
            .block_on(certs_d_client(vec![elsewhere]).resolve(&r, None))
            .unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");

        if client_certs {
            // Trusted, but without the client certificate: refused in the handshake.
            std::fs::remove_file(dir.join("client.cert")).unwrap();
            std::fs::remove_file(dir.join("client.key")).unwrap();
            let err = rt
                .block_on(certs_d_client(vec![docker.clone()]).resolve(&r, None))
                .unwrap_err();
            assert!(matches!(err, Error::Unreachable { .. }), "{err}");
            // A certificate without its key is a configuration error, said as one.
            std::fs::write(dir.join("client.cert"), "x").unwrap();
            let err = rt
                .block_on(certs_d_client(vec![docker.clone()]).resolve(&r, None))
                .unwrap_err();
            assert!(err.to_string().contains("without its key"), "{err}");
        }
        assert_eq!(tap.plain_connections(), Vec::<String>::new());
    }
}

/// The registries.conf convention: a pull-through cache (distribution's `proxy.remoteurl`) in
/// front of the registry serves manifests and range reads; when it is down the registry does;
/// when the registry is down, what the mirror kept is still served.
#[test]
fn mirrors_serve_first_and_the_registry_stays_the_fallback() {
    let rt = clip_testkit::runtime();
    let mut upstream = Registry::start_anonymous().unwrap();
    let built = image().build().unwrap();
    upstream.push(&built, "tk/mirrored", "v1").unwrap();
    let mut mirror = Registry::start(RegistryOptions {
        proxy_of: Some(upstream.base_url()),
        ..Default::default()
    })
    .unwrap();
    let conf = format!(
        "[[registry]]\nlocation = \"{}\"\n[[registry.mirror]]\nlocation = \"{}\"\ninsecure = true\n",
        upstream.host(),
        mirror.host()
    );
    let cfg = || ClientConfig {
        mirrors: clip_registry::mirrors::parse(&conf).unwrap(),
        retry: RetryPolicy {
            attempts: 2,
            base: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            deadline: Duration::from_secs(5),
        },
        ..ClientConfig::default()
    };
    let r = Reference::parse(&format!("{}/tk/mirrored:v1", upstream.host())).unwrap();
    let layer = dg(&built.manifests[0].layers[0].blob.digest);
    let want = &built.manifests[0].layers[0].blob.bytes;
    let mirror_blob_requests = |m: &Registry| {
        m.log()
            .lines()
            .filter(|l| l.contains("GET /v2/tk/mirrored/blobs/"))
            .count()
    };

    let c = Client::new(cfg()).unwrap();
    let img = rt.block_on(c.resolve(&r, None)).unwrap();
    assert!(
        mirror.log().contains("/v2/tk/mirrored/manifests/v1"),
        "{}",
        mirror.log()
    );
    let before = mirror_blob_requests(&mirror);
    let bytes = rt
        .block_on(c.read_range(&img.reference, &layer, 100..5000))
        .unwrap();
    assert_eq!(&bytes[..], &want[100..5000]);
    // (The access log line is written when the mirror finishes answering.)
    let start = Instant::now();
    while mirror_blob_requests(&mirror) == before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            mirror.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The mirror keeps the blob (in the background, after its first fetch).
    let start = Instant::now();
    while !mirror.has_blob(layer.as_str()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "mirror never kept the blob"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Mirror down: the registry answers (a fresh client, as a new mount would have).
    mirror.stop();
    let c = Client::new(cfg()).unwrap();
    let bytes = rt
        .block_on(c.read_range(&img.reference, &layer, 0..4096))
        .unwrap();
    assert_eq!(&bytes[..], &want[..4096]);

    // Registry down, mirror back: what it kept is served, and verified.
    mirror.restart().unwrap();
    upstream.stop();
    let c = Client::new(cfg()).unwrap();
    let bytes = rt
        .block_on(c.read_range(&img.reference, &layer, 7..9000))
        .unwrap();
    assert_eq!(&bytes[..], &want[7..9000]);
    let whole = rt
        .block_on(c.blob_bytes(&img.reference, &layer, 1 << 20))
        .unwrap();
    assert_eq!(&whole[..], &want[..]);
}

#[test]
fn an_unreachable_registry_is_named_after_retries() {
    let rt = clip_testkit::runtime();
    let mut reg = Registry::start_anonymous().unwrap();
    reg.push(&image().build().unwrap(), "tk/down", "v1")
        .unwrap();
    let c = client_for(&reg, None);
    let r = Reference::parse(&format!("{}/tk/down:v1", reg.host())).unwrap();
    let img = rt.block_on(c.resolve(&r, None)).unwrap();
    reg.stop();
    let err = rt.block_on(c.resolve(&r, None)).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "registry {} is not reachable (connection refused)",
            reg.host()
        )
    );
    reg.restart().unwrap();
    let again = rt.block_on(c.resolve(&r, None)).unwrap();
    assert_eq!(again.manifest_digest, img.manifest_digest);
}

#[test]
fn picks_the_platform_from_an_index() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start_anonymous().unwrap();
    let amd = Image::new(vec![Layer::new(vec![Entry::file("arch", "amd64\n")])]);
    let arm = Image::new(vec![Layer::new(vec![Entry::file("arch", "arm64\n")])]).platform(
        "linux",
        "arm64",
        Some("v8"),
    );
    let built = ImageBuilder::new(ManifestFormat::Docker)
        .image(amd)
        .image(arm)
        .build()
        .unwrap();
    reg.push(&built, "tk/multi", "v1").unwrap();
    let c = client_for(&reg, None);
    let r = Reference::parse(&format!("{}/tk/multi:v1", reg.host())).unwrap();
    let img = rt
        .block_on(c.resolve(
            &r,
            Some(&clip_registry::oci::parse_platform("linux/arm64/v8").unwrap()),
        ))
        .unwrap();
    assert_eq!(
        img.manifest_digest.as_str(),
        built.manifests[1].manifest.digest
    );
    let img = rt.block_on(c.resolve(&r, None)).unwrap();
    assert_eq!(
        img.manifest_digest.as_str(),
        built.manifests[0].manifest.digest
    );
    let err = rt
        .block_on(c.resolve(
            &r,
            Some(&clip_registry::oci::parse_platform("linux/s390x").unwrap()),
        ))
        .unwrap_err();
    assert!(err.to_string().contains("platform linux/s390x"), "{err}");
}

#[test]
fn credentials_come_from_docker_config_auths_and_helpers() {
    use std::os::unix::fs::PermissionsExt;
    let rt = clip_testkit::runtime();
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Basic {
            username: "carol".into(),
            password: "s3cr3t".into(),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    reg.push(&image().build().unwrap(), "tk/dc", "v1").unwrap();
    let r = Reference::parse(&format!("{}/tk/dc:v1", reg.host())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let with = |cfg_json: String| {
        let path = dir.path().join("config.json");
        std::fs::write(&path, cfg_json).unwrap();
        let dc = clip_registry::dockerconfig::DockerConfig::load(&path)
            .unwrap()
            .with_helper_dir(dir.path().to_owned());
        Client::new(ClientConfig {
            docker_config: Some(std::sync::Arc::new(dc)),
            ..ClientConfig::default()
        })
        .unwrap()
    };
    // `auths` with a base64 user:password, keyed the way `docker login` writes it.
    let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "carol:s3cr3t");
    let c = with(format!(
        r#"{{"auths": {{"http://{}": {{"auth": "{auth}"}}}}}}"#,
        reg.host()
    ));
    rt.block_on(c.resolve(&r, None)).unwrap();
    // A credential helper process answering `get` with the server on stdin.
    let helper = dir.path().join("docker-credential-cliptest");
    std::fs::write(&helper, format!("#!/bin/sh\nread server\n[ \"$server\" = \"{}\" ] || exit 1\necho '{{\"Username\":\"carol\",\"Secret\":\"s3cr3t\"}}'\n", reg.host())).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = with(format!(
        r#"{{"credHelpers": {{"{}": "cliptest"}}}}"#,
        reg.host()
    ));
    rt.block_on(c.resolve(&r, None)).unwrap();
    // A helper that fails is reported, and a missing entry means anonymous (then unauthorized).
    let c = with(r#"{"credsStore": "missing-helper"}"#.into());
    let err = rt.block_on(c.resolve(&r, None)).unwrap_err();
    assert!(
        err.to_string().contains("docker-credential-missing-helper"),
        "{err}"
    );
    let c = with("{}".into());
    assert!(matches!(
        rt.block_on(c.resolve(&r, None)).unwrap_err(),
        Error::Unauthorized { .. }
    ));
}

#[test]
fn reads_ride_out_a_registry_restart() {
    let mut reg = Registry::start_anonymous().unwrap();
    let built = image().build().unwrap();
    reg.push(&built, "tk/restart", "v1").unwrap();
    let blob = built.manifests[0].layers[0].blob.clone();
    let r = Reference::parse(&format!("{}/tk/restart:v1", reg.host())).unwrap();
    let c = Client::new(ClientConfig {
        retry: RetryPolicy {
            attempts: 30,
            base: Duration::from_millis(50),
            max_delay: Duration::from_millis(400),
            deadline: Duration::from_secs(15),
        },
        ..ClientConfig::default()
    })
    .unwrap();
    let reader = std::thread::spawn(move || {
        let rt = clip_testkit::runtime();
        let img = rt.block_on(c.resolve(&r, None)).unwrap();
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed() < Duration::from_secs(4) {
            let a = (n * 4099) % (blob.bytes.len() - 1000);
            let got = rt
                .block_on(c.read_range(
                    &img.reference,
                    &dg(&blob.digest),
                    a as u64..a as u64 + 1000,
                ))
                .unwrap();
            assert_eq!(&got[..], &blob.bytes[a..a + 1000]);
            n += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        n
    });
    std::thread::sleep(Duration::from_millis(800));
    reg.stop();
    std::thread::sleep(Duration::from_millis(1200));
    reg.restart().unwrap();
    let reads = reader.join().unwrap();
    assert!(
        reads > 50,
        "{reads} reads, every one correct across the outage"
    );
}

#[test]
fn docker_identity_tokens_use_the_oauth2_refresh_grant() {
    let rt = clip_testkit::runtime();
    let reg = Registry::start(RegistryOptions {
        auth: Auth::Token {
            users: vec![("dan".into(), "pw".into())],
            anonymous_pull: false,
            lifetime: Duration::from_mins(1),
        },
        tls: false,
        ..Default::default()
    })
    .unwrap();
    reg.push(&image().build().unwrap(), "tk/oauth", "v1")
        .unwrap();
    // Obtain a refresh token with the password grant, as `docker login` does.
    let realm = rt.block_on(async {
        let resp = reqwest::Client::new()
            .get(format!("http://{}/v2/", reg.host()))
            .send()
            .await
            .unwrap();
        let h = resp.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .to_owned();
        h.split("realm=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned()
    });
    let refresh = rt.block_on(async {
        let body = "grant_type=password&username=dan&password=pw&service=clip-testkit-registry&client_id=docker";
        let resp = reqwest::Client::new().post(&realm).header("content-type", "application/x-www-form-urlencoded").body(body).send().await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        v["refresh_token"].as_str().unwrap().to_owned()
    });
    let posts_before = reg
        .token_stats()
        .unwrap()
        .post_tokens
        .load(std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let with = |token: &str| {
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{"{}": {{"identitytoken": "{token}"}}}}}}"#,
                reg.host()
            ),
        )
        .unwrap();
        let dc = clip_registry::dockerconfig::DockerConfig::load(&path).unwrap();
        Client::new(ClientConfig {
            docker_config: Some(std::sync::Arc::new(dc)),
            ..ClientConfig::default()
        })
        .unwrap()
    };
    let r = Reference::parse(&format!("{}/tk/oauth:v1", reg.host())).unwrap();
    rt.block_on(with(&refresh).resolve(&r, None)).unwrap();
    let posts = reg
        .token_stats()
        .unwrap()
        .post_tokens
        .load(std::sync::atomic::Ordering::SeqCst)
        - posts_before;
    assert!(posts >= 1, "the client used the refresh grant");
    let err = rt.block_on(with("rt-bogus").resolve(&r, None)).unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
}

/// A big blob is fetched as parallel ranges, handed on in order (the bytes hash to the digest),
/// and a small one as one stream.
#[test]
fn big_blobs_stream_as_parallel_ranges_in_order() {
    use std::io::Read as _;
    let rt = clip_testkit::runtime();
    let reg = Registry::start_anonymous().unwrap();
    let size = clip_registry::PARALLEL_MIN as usize + (3 << 20) + 12_345;
    let img = Image::new(vec![
        Layer::new(vec![Entry::file("big", random_bytes(9, size))])
            .compression(clip_testkit::Compression::None),
    ]);
    let built = ImageBuilder::new(ManifestFormat::Oci)
        .image(img)
        .build()
        .unwrap();
    reg.push(&built, "tk/big", "v1").unwrap();
    let layer = &built.manifests[0].layers[0].blob;
    let digest = dg(&layer.digest);
    let r = Reference::parse(&format!("{}/tk/big@{}", reg.host(), built.digest())).unwrap();
    let c = client_for(&reg, None);
    let before = reg.log().matches("\" 206 ").count();
    let mut reader = c.blob_reader_sized(rt.handle(), &r, &digest, layer.bytes.len() as u64);
    let mut all = Vec::new();
    reader.read_to_end(&mut all).unwrap();
    assert!(all == layer.bytes, "bytes differ or are out of order");
    let ranges = reg.log().matches("\" 206 ").count() - before;
    let expected = layer
        .bytes
        .len()
        .div_ceil(clip_registry::PARALLEL_CHUNK as usize);
    assert!(
        ranges > expected,
        "{ranges} range answers for {expected} chunks (+ the probe)"
    );
}
