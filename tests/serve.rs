//! `sidrec serve` as a client sees it: the real binary is started on a free loopback
//! port with a model trained here, and every endpoint is called over HTTP, with good and
//! bad input, one at a time and concurrently; then SIGTERM must stop it cleanly.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use serde_json::{json, Value};

mod common;

fn model() -> &'static Path {
    static MODEL: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &MODEL
        .get_or_init(|| {
            let tmp = tempfile::tempdir().unwrap();
            let dir = common::trained_model(tmp.path());
            (tmp, dir)
        })
        .1
}

/// A running `sidrec serve`; killed when dropped (a test that fails midway leaves no
/// server behind).
struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sidrec"))
            .args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(model())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Server { child, base: addr }
    }

    /// Sends a request; returns the status and the JSON body (every answer, errors
    /// included, must be JSON).
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let req = ureq::request(method, &format!("{}{path}", self.base));
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_string(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text:?}"));
        (status, v)
    }

    fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(&body.to_string()))
    }

    /// SIGTERM, then the exit status and what it wrote to stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            use std::io::Read;
            e.read_to_string(&mut err).unwrap();
        }
        (status, err)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An error answer: the status expected and a message containing `says`.
fn assert_error(got: (u16, Value), status: u16, says: &str) {
    let (s, v) = got;
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {v}"));
    assert_eq!(s, status, "{msg}");
    assert!(msg.contains(says), "{msg:?} does not say {says:?}");
}

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
