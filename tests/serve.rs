//! `sidrec serve` as a client sees it: the real binary is started on a free loopback
//! port with a model trained here, and every endpoint is called over HTTP, with good and
//! bad input, one at a time and concurrently; then SIGTERM must stop it cleanly. A model
//! with NaN weights must be refused at start, and `recommend`, the REPL and the server
//! must refuse the same out-of-range requests in the same words. (Connections, timeouts
//! and shutdown under held sockets: `tests/serve_conn.rs`.)

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
#[path = "common/server.rs"]
mod server;

use server::{assert_error, model, Server};

fn ids(v: &Value) -> Vec<String> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn endpoints_answer_and_bad_input_gets_4xx_json() {
    let s = Server::start(&["--max-body", "4096"]);

    let (st, h) = s.call("GET", "/healthz", None);
    assert_eq!(st, 200);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["items"], 10);
    assert_eq!(h["types"], json!(["movie", "podcast"]));
    // The probe decoded at start, and no path on the server's disk.
    assert_eq!(h["probe"]["ok"], true, "{h}");
    assert!(h["probe"]["took_ms"].as_f64().unwrap() > 0.0, "{h}");
    let dir = model().to_str().unwrap();
    assert!(!h.to_string().contains(dir), "{h}");
    assert!(h.get("model").is_none(), "{h}");

    let (st, it) = s.call("GET", "/v1/items/m1", None);
    assert_eq!(st, 200);
    assert_eq!(it["title"], "Toy Story");
    assert_eq!(it["type"], "movie");
    assert_eq!(it["attrs"]["year"], 1995);
    assert!(it["sid"].as_str().unwrap().starts_with("<movie>"));
    assert_error(s.call("GET", "/v1/items/zz", None), 404, "zz");

    // Recommend: k distinct catalog items, best first, with titles and SIDs.
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"history": ["m1", "Heat"], "k": 4, "exclude_seen": true}),
    );
    assert_eq!(st, 200, "{r}");
    let items = r["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    let got = ids(&r);
    assert!(!got.contains(&"m1".to_string()) && !got.contains(&"m2".to_string()));
    let mut uniq = got.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4);
    for (n, i) in items.iter().enumerate() {
        assert_eq!(i["rank"], n + 1);
        let (st, one) = s.call(
            "GET",
            &format!("/v1/items/{}", i["id"].as_str().unwrap()),
            None,
        );
        assert_eq!(st, 200);
        assert_eq!(one["title"], i["title"]);
        assert_eq!(one["sid"], i["sid"]);
    }
    let scores: Vec<f64> = items.iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(r["history"], json!(["m1", "m2"]));
    assert!(r["took_ms"].as_f64().unwrap() > 0.0);
    // The mixture with recent items alone: still k distinct items, best first; a bound.
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"history": ["m1", "m3", "m4"], "k": 4, "mix_recent": 2}),
    );
    assert_eq!(st, 200, "{r}");
    let mut got = ids(&r);
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 4);
    assert_error(
        s.post(
            "/v1/recommend",
            json!({"history": ["m1"], "mix_recent": 99}),
        ),
        400,
        "mix_recent must be 0 to 8",
    );
    assert_error(
        s.post(
            "/v1/recommend",
            json!({"history": ["m1", "m3"], "mix_recent": 1, "recent_decay": -1.0}),
        ),
        400,
        "decay must be a positive number",
    );
    // The model's transition memory mixes in; a weight below zero is refused.
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"history": ["m1", "m3"], "k": 3, "memory": 1.0}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["items"].as_array().unwrap().len(), 3, "{r}");
    assert_error(
        s.post(
            "/v1/recommend",
            json!({"history": ["m1", "m3"], "memory": -1.0}),
        ),
        400,
        "memory weight",
    );

    // Limits: types, filter; titles in the query join the history.
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"history": ["m1"], "types": ["podcast"], "k": 3}),
    );
    assert_eq!(st, 200, "{r}");
    assert!(ids(&r).iter().all(|i| i.starts_with('p')), "{r}");
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"history": ["m1"], "filter": "year>=1990", "k": 10}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(ids(&r).len(), 4, "four items from the 1990s: {r}");
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"query": "a thriller like Heat", "k": 3}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["history"], json!(["m2"]));
    assert_eq!(r["query"], "a thriller");
    assert_eq!(r["filter"], "genre=Thriller");
    assert_eq!(
        r["read"][1],
        json!({"words": "thriller", "clause": "genre=Thriller"})
    );
    // Heat is left out; the only other thriller is Fargo.
    assert_eq!(ids(&r), ["m6"]);
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"query": "a thriller like Heat", "k": 3, "literal": true}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        (r["history"].clone(), r["read"].clone()),
        (json!([]), json!([]))
    );
    assert_eq!(ids(&r).len(), 3);
    let (st, r) = s.post(
        "/v1/recommend",
        json!({"query": "a comedy", "mode": "search", "k": 2}),
    );
    assert_eq!(st, 200, "{r}");
    assert_eq!(ids(&r).len(), 2);

    // Generate: text and items, every item from the catalog; seeded, so repeatable.
    let body = json!({"history": ["m1", "m5"], "mode": "chat", "query": "what next?", "max_tokens": 24, "temperature": 0.8, "seed": 3});
    let (st, g) = s.post("/v1/generate", body.clone());
    assert_eq!(st, 200, "{g}");
    for o in g["output"].as_array().unwrap() {
        match o["kind"].as_str().unwrap() {
            "text" => assert!(o["text"].is_string()),
            "item" => assert_eq!(
                s.call(
                    "GET",
                    &format!("/v1/items/{}", o["id"].as_str().unwrap()),
                    None
                )
                .0,
                200
            ),
            k => panic!("unknown kind {k}"),
        }
    }
    assert!(g["text"].is_string());
    assert_eq!(s.post("/v1/generate", body).1["output"], g["output"]);
    let (st, d) = s.post(
        "/v1/generate",
        json!({"history": ["m1", "m5"], "max_tokens": 16}),
    );
    assert_eq!(st, 200, "{d}");
    assert!(
        d["output"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["kind"] == "text"),
        "describe is text: {d}"
    );

    // Bad input: a 4xx and a JSON message that says what was wrong.
    let rec = |b: Value| s.post("/v1/recommend", b);
    assert_error(
        rec(json!({"history": ["m1"], "k": 0})),
        400,
        "k must be 1 to 100",
    );
    assert_error(
        rec(json!({"history": ["m1"], "k": 1000})),
        400,
        "k must be 1 to 100",
    );
    assert_error(
        rec(json!({"histroy": ["m1"]})),
        422,
        "unknown field `histroy`",
    );
    assert_error(rec(json!({"history": "m1"})), 422, "history");
    assert_error(
        rec(json!({"history": ["no such film"]})),
        400,
        "no item matches",
    );
    assert_error(
        rec(json!({"history": ["m1"], "types": ["song"]})),
        400,
        "unknown type \"song\"",
    );
    assert_error(
        rec(json!({"history": ["m1"], "filter": "year>>1"})),
        400,
        "filter",
    );
    assert_error(
        rec(json!({"history": ["m1"], "filter": "year>=3000"})),
        400,
        "no catalog item",
    );
    assert_error(
        rec(json!({"history": ["m1"], "mode": "describe"})),
        400,
        "not served here",
    );
    assert_error(rec(json!({"mode": "recommend"})), 400, "needs a history");
    assert_error(rec(json!({})), 400, "needs a text query");
    assert_error(
        s.call("POST", "/v1/recommend", Some("{\"history\": [")),
        400,
        "JSON",
    );
    // Serde would read an array as the fields in order; only an object is a request.
    for (path, body) in [
        ("/v1/recommend", "[\"a comedy\", [\"m1\"]]"),
        ("/v1/generate", " [\"hi\"]"),
        ("/v1/recommend", "\"m1\""),
    ] {
        assert_error(
            s.call("POST", path, Some(body)),
            400,
            "must be a JSON object",
        );
    }
    let resp = ureq::post(&format!("{}/v1/recommend", s.base))
        .set("Content-Type", "text/plain")
        .send_string("{}");
    match resp {
        Err(ureq::Error::Status(415, r)) => assert!(r.into_string().unwrap().contains("error")),
        other => panic!("expected 415, got {other:?}"),
    }
    // Over-long: a prompt longer than the model reads (256 tokens here), a query over the
    // server's limit, a body over --max-body.
    let long = "word ".repeat(300);
    assert_error(
        rec(json!({"query": long, "mode": "search"})),
        400,
        "this model reads at most 256",
    );
    assert_error(rec(json!({"query": "x".repeat(2001)})), 413, "at most 2000");
    let big = json!({"query": "y".repeat(5000)}).to_string();
    assert_error(
        s.call("POST", "/v1/recommend", Some(&big)),
        413,
        "length limit",
    );
    let gen = |b: Value| s.post("/v1/generate", b);
    assert_error(
        gen(json!({"query": "hi", "temperature": -1.0})),
        400,
        "temperature",
    );
    assert_error(gen(json!({"query": "hi", "top_p": 0.0})), 400, "top_p");
    assert_error(
        gen(json!({"query": "hi", "max_tokens": 100000})),
        400,
        "max_tokens",
    );
    assert_error(
        gen(json!({"query": "hi", "format": "video"})),
        400,
        "unknown format",
    );
    assert_error(s.call("GET", "/v1/nope", None), 404, "no such endpoint");
    assert_error(
        s.call("GET", "/v1/recommend", None),
        405,
        "method not allowed",
    );
    assert_error(
        s.call("DELETE", "/healthz", None),
        405,
        "method not allowed",
    );

    // Still serving after all of that.
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
    let (status, err) = s.stop();
    assert!(status.success(), "{status:?}: {err}");
}

#[test]
fn concurrent_clients_share_one_model_and_sigterm_stops_cleanly() {
    let s = Server::start(&["--workers", "2"]);
    let histories = [
        json!(["m1", "m2"]),
        json!(["p1"]),
        json!(["m3", "m4", "m5"]),
    ];
    let body = |u: usize| json!({"history": histories[u % 3], "k": 3});
    // The answer each request must get, asked alone.
    let want: Vec<Value> = (0..3)
        .map(|u| s.post("/v1/recommend", body(u)).1["items"].clone())
        .collect();
    std::thread::scope(|sc| {
        for t in 0..6 {
            let (s, want, body) = (&s, &want, &body);
            sc.spawn(move || {
                for n in 0..15 {
                    let u = t + n;
                    let (st, r) = s.post("/v1/recommend", body(u));
                    assert_eq!(st, 200, "{r}");
                    assert_eq!(
                        r["items"],
                        want[u % 3],
                        "same request, same answer under load"
                    );
                }
            });
        }
    });
    let (status, err) = s.stop();
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("stopped"), "{err}");
}

/// Without --model the server needs the demo model; with a missing directory it says
/// which and exits non-zero, without serving.
#[test]
fn a_missing_model_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_sidrec"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--model",
            "/nonexistent/model",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/model"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_sidrec"))
        .args(["serve", "--workers", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
}

/// Every file of `from` copied into `to`, subdirectories (ensemble members) included.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The trained model with its token embeddings (tied to the output head) all NaN: what
/// a diverged run leaves behind. `SHA256SUMS`, if any, is dropped with the old weights.
fn nan_model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("nan-model");
            copy_dir(model(), &dir);
            let _ = std::fs::remove_file(dir.join("SHA256SUMS"));
            let bytes = std::fs::read(model().join("model.safetensors")).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let name = st
                .names()
                .into_iter()
                .find(|n| n.contains("embed_tokens"))
                .expect("an embedding tensor")
                .to_string();
            let embedding = st.tensor(&name).unwrap();
            assert_eq!(embedding.dtype(), safetensors::Dtype::F32);
            let shape = embedding.shape().to_vec();
            let nan = f32::NAN.to_le_bytes().repeat(shape.iter().product());
            let mut tensors = st.tensors();
            for (n, view) in tensors.iter_mut() {
                if *n == name {
                    *view = safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        &nan,
                    )
                    .unwrap();
                }
            }
            let out = safetensors::serialize(tensors, meta.metadata().clone()).unwrap();
            std::fs::write(dir.join("model.safetensors"), out).unwrap();
            (tmp, dir)
        })
        .1
}

/// A model that cannot answer is refused at start with a message, before it listens,
/// rather than answering every request with an empty list.
#[test]
fn serve_refuses_a_model_with_nan_weights() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sidrec"))
        .args(["serve", "--addr", "127.0.0.1:0", "--model"])
        .arg(nan_model())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve is still running on a model with NaN weights");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "{out}{err}");
    assert!(!out.contains("listening"), "{out}");
    assert!(err.contains("probe"), "{err}");
}

/// `recommend` on the same model must fail too, not print nothing and exit 0.
#[test]
fn recommend_fails_on_a_model_with_nan_weights() {
    let out = Command::new(env!("CARGO_BIN_EXE_sidrec"))
        .args([
            "recommend",
            "--json",
            "--history",
            "m1",
            "-k",
            "3",
            "--model",
        ])
        .arg(nan_model())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `recommend`, the REPL and `serve` refuse the same out-of-range requests in the same
/// words; the CLI exits non-zero and prints nothing to stdout.
#[test]
fn recommend_repl_and_serve_share_their_limits() {
    let s = Server::start(&[]);
    let long = "x".repeat(2001);
    let cases: Vec<(Vec<&str>, &str, Value, u16, &str)> = vec![
        (
            vec!["-k", "0"],
            "/v1/recommend",
            json!({"k": 0}),
            400,
            "k must be 1 to 100, got 0",
        ),
        (
            vec!["-k", "100000"],
            "/v1/recommend",
            json!({"k": 100000}),
            400,
            "k must be 1 to 100, got 100000",
        ),
        (
            vec!["--beams", "0"],
            "/v1/recommend",
            json!({"beams": 0}),
            400,
            "beams must be 1 to 200, got 0",
        ),
        (
            vec!["--mix-recent", "9"],
            "/v1/recommend",
            json!({"mix_recent": 9}),
            400,
            "mix_recent must be 0 to 8, got 9",
        ),
        (
            vec!["--max-tokens", "0", "--mode", "describe"],
            "/v1/generate",
            json!({"max_tokens": 0}),
            400,
            "max_tokens must be 1 to 512, got 0",
        ),
        (
            vec![long.as_str()],
            "/v1/recommend",
            json!({"query": long}),
            413,
            "query is 2001 bytes; at most 2000 are read",
        ),
    ];
    for (flags, path, mut body, status, says) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_sidrec"))
            .args(["recommend", "--history", "m1", "--model"])
            .arg(model())
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?}");
        assert!(out.stdout.is_empty(), "{flags:?}");
        assert!(err.contains(says), "{flags:?}: {err}");
        body["history"] = json!(["m1"]);
        assert_error(s.post(path, body), status, says);
    }
    // A good request between the bad ones still works: the bounds themselves pass.
    let out = Command::new(env!("CARGO_BIN_EXE_sidrec"))
        .args([
            "recommend",
            "--history",
            "m1",
            "-k",
            "3",
            "--beams",
            "1",
            "--model",
        ])
        .arg(model())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);

    let out = Command::new(env!("CARGO_BIN_EXE_sidrec"))
        .args(["repl", "--no-history-file", "--model"])
        .arg(model())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .unwrap()
                .write_all(b":k 0\n:k 100000\n:k 2\n:show\n:quit\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("error: k must be 1 to 100, got 0"), "{text}");
    assert!(
        text.contains("error: k must be 1 to 100, got 100000"),
        "{text}"
    );
    assert!(text.contains("| k 2 |"), "{text}");
    let (status, err) = s.stop();
    assert!(status.success(), "{status:?}: {err}");
}
