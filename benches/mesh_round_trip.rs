//! A cross-shard round trip over glommio's channel mesh (what a request
//! for a user homed on another shard pays: `Append` there, `Appended`
//! back), between two executors: unpinned, pinned, and spinning before
//! they park (glommio's `spin_before_park`), which trades idle CPU for
//! wake-up latency.

#[path = "support/mod.rs"]
mod support;

use std::sync::mpsc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::{LocalExecutorBuilder, Placement};

fn start(pinned: bool, spin: Option<Duration>) -> support::AsyncBench {
    let mesh: MeshBuilder<u64, Full> = MeshBuilder::full(2, 1024);
    let echo_mesh = mesh.clone();
    let placement = if pinned { Placement::Fixed(1) } else { Placement::Unbound };
    // The echoing shard: answers every message to whoever sent it.
    let mut echo = LocalExecutorBuilder::new(placement).name("mesh-echo");
    let mut bench = LocalExecutorBuilder::new(Placement::Unbound).name("mesh-bench");
    if let Some(d) = spin {
        echo = echo.spin_before_park(d);
        bench = bench.spin_before_park(d);
    }
    echo.spawn(move || async move {
        let (senders, mut receivers) = echo_mesh.join().await.expect("join the mesh");
        let me = senders.peer_id();
        let peer = 1 - me;
        let stream = receivers.streams().into_iter().find(|(from, _)| *from == peer).expect("a stream from the peer").1;
        while let Some(v) = stream.recv().await {
            if senders.send_to(peer, v + 1).await.is_err() {
                break;
            }
        }
    })
    .expect("start the echo executor"); // detached: lives as long as the process
    let (ready_tx, ready_rx) = mpsc::channel();
    let bench = support::AsyncBench::start_with(bench, move || async move {
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
    let spin = Some(Duration::from_micros(200));
    let variants = [
        ("round trip, 2 unpinned executors", false, None),
        ("round trip, echo pinned to CPU 1", true, None),
        ("round trip, both spin 200 us before parking", false, spin),
    ];
    for (name, pinned, spin) in variants {
        if pinned && cpus < 2 {
            continue;
        }
        let b = start(pinned, spin);
        g.bench_function(name, |bench| bench.iter_custom(|n| b.run(n)));
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
