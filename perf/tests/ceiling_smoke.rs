//! The harness against its own ceiling server, in process: the load loop,
//! both load models and the report work without an engine binary.

use esh3ar_perf::ceiling::spawn_background;
use esh3ar_perf::cli::{run, run_args};

#[test]
fn closed_and_open_loop_against_the_ceiling() {
    let addr = spawn_background(1).expect("ceiling starts").to_string();
    for model in [&["--model", "closed"][..], &["--model", "open", "--rate", "500"][..]] {
        let mut args = vec!["--system", "ceiling", "--addr", &addr, "--cpus", "none", "--connections", "8"];
        args.extend_from_slice(&["--duration", "1s", "--warmup", "100ms"]);
        args.extend_from_slice(model);
        let r = run(&run_args(&args).unwrap()).unwrap();
        assert!(r.errors.is_empty(), "{}", r.human());
        assert!(r.accepted > 100, "{}", r.human());
        assert!(r.acceptance.p50_ms > 0.0 && r.acceptance.max_ms >= r.acceptance.p99_ms, "{}", r.human());
    }
}

#[test]
fn peers_need_an_address() {
    let err = run(&run_args(&["--system", "redis"]).unwrap()).unwrap_err();
    assert!(err.to_string().contains("--addr"), "{err}");
}
