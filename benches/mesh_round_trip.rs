//! A cross-shard round trip over glommio's channel mesh (what a request
//! for a user homed on another shard pays: `Append` there, `Appended`
//! back), between two executors, unpinned and pinned to two CPUs.

#[path = "support/mod.rs"]
mod support;

use std::sync::mpsc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{LocalExecutorBuilder, Placement};

fn start(pinned: bool) -> support::AsyncBench {
    let mesh: MeshBuilder<u64, Full> = MeshBuilder::full(2, 1024);
    let echo_mesh = mesh.clone();
    let placement = if pinned { Placement::Fixed(1) } else { Placement::Unbound };
    // The echoing shard: answers every message to whoever sent it.
    LocalExecutorBuilder::new(placement)
        .name("mesh-echo")
        .spawn(move || async move {
            let (senders, mut receivers) = echo_mesh.join().await.expect("join the mesh");
            let me = senders.peer_id();
            let peer = 1 - me;
            let stream =
                receivers.streams().into_iter().find(|(from, _)| *from == peer).expect("a stream from the peer").1;
            while let Some(v) = stream.recv().await {
                if senders.send_to(peer, v + 1).await.is_err() {
                    break;
                }
            }
        })
        .expect("start the echo executor"); // detached: lives as long as the process
    let (ready_tx, ready_rx) = mpsc::channel();
    let bench = support::AsyncBench::start("mesh-bench", move || async move {
        let (senders, mut receivers) = mesh.join().await.expect("join the mesh");
        let peer = 1 - senders.peer_id();
        let stream = receivers.streams().into_iter().find(|(from, _)| *from == peer).expect("a stream").1;
        let _ = ready_tx.send(());
        let senders = std::rc::Rc::new(senders);
        let stream = std::rc::Rc::new(stream);
        move || {
            let (senders, stream) = (senders.clone(), stream.clone());
            async move {
                senders.send_to(peer, 1).await.expect("send");
                stream.recv().await.expect("reply");
            }
        }
    });
    ready_rx.recv().expect("mesh joined");
    bench
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesh");
    g.throughput(Throughput::Elements(1));
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for pinned in [false, true] {
        if pinned && cpus < 2 {
            continue;
        }
        let b = start(pinned);
        let name = if pinned {
            "round trip, 2 executors (bench unpinned, echo on CPU 1)"
        } else {
            "round trip, 2 unpinned executors"
        };
        g.bench_function(name, |bench| bench.iter_custom(|n| b.run(n)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
