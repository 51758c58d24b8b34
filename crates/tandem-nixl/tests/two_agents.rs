//! Two agents in one process, each on its own thread: a UCX READ of DRAM blocks with the
//! notification attached, as a decode engine pulls from a prefill engine. Needs the NIXL
//! libraries (LD_LIBRARY_PATH, NIXL_PLUGIN_DIR); run with `--features nixl -- --test-threads=1`.
#![cfg(feature = "nixl")]

use std::time::Duration;

use tandem_nixl::{standin, Layout, NixlThread, RemoteLayout};

#[tokio::test]
async fn read_moves_the_blocks_and_delivers_the_notification() {
    let layout = Layout {
        layers: 3,
        num_blocks: 8,
        block_len: 96,
    };
    let (ntx, mut nrx) = tokio::sync::mpsc::unbounded_channel();
    let prefill = NixlThread::start("it-prefill", layout, Some(ntx))
        .await
        .unwrap();
    let decode = NixlThread::start("it-decode", layout, None).await.unwrap();
    // The prefill side writes blocks 5 and 2 with the stand-ins of two digests.
    let digests = [[1u8; 32], [2u8; 32]];
    prefill
        .call(move |a| {
            for (b, d) in [5u32, 2].into_iter().zip(digests) {
                for layer in 0..3 {
                    a.write_block(b, layer, |out| standin::fill(&d, layer, out))
                        .unwrap();
                }
            }
        })
        .await
        .unwrap();
    let info = prefill.info().clone();
    let md = info.metadata.clone();
    let name = decode
        .call(move |a| a.load_remote(&md))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name, "it-prefill");
    let remote = RemoteLayout {
        agent: name,
        base_addrs: info.base_addrs.clone(),
        block_len: 96,
    };
    let report = decode
        .call(move |a| {
            let r = a.read(
                &remote,
                &[5, 2],
                &[0, 7],
                Some(b"req-1:1"),
                Duration::from_secs(5),
            )?;
            let mut got = Vec::new();
            for (lb, d) in [0u32, 7].into_iter().zip(digests) {
                for layer in 0..3 {
                    got.push(standin::first_mismatch(&d, layer, a.block(lb, layer)?));
                }
            }
            Ok::<_, tandem_nixl::NixlFailure>((r, got))
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.0.bytes, 2 * 3 * 96);
    assert_eq!(report.0.descriptors, 6);
    assert!(report.1.iter().all(Option::is_none), "{:?}", report.1);
    let (from, msg) = tokio::time::timeout(Duration::from_secs(5), nrx.recv())
        .await
        .expect("notification within 5 s")
        .unwrap();
    assert_eq!((from.as_str(), msg.as_str()), ("it-decode", "req-1:1"));
}

#[tokio::test]
async fn metadata_that_is_not_an_agents_is_refused_not_fatal() {
    let layout = Layout {
        layers: 1,
        num_blocks: 2,
        block_len: 64,
    };
    let a = NixlThread::start("it-lonely", layout, None).await.unwrap();
    // What a TCP-transport sim advertises in place of real agent metadata.
    let md = b"tandem-sim-nixl-agent:engine:0".to_vec();
    let r = a.call(move |ag| ag.load_remote(&md)).await.unwrap();
    assert!(r.is_err(), "{r:?}");
    // The agent is still usable afterwards.
    let own = a.info().metadata.clone();
    assert!(!own.is_empty());
}
