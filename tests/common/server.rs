//! A running `sidrec serve` for the tests that talk to one over HTTP (`tests/serve.rs`,
//! `tests/serve_conn.rs`): the real binary on a free loopback port, with the fixture
//! model trained once per test binary.
#![allow(dead_code)] // each test binary uses its own part

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::common::shared_model as model;

/// A running `sidrec serve`; killed when dropped (a test that fails midway leaves no
/// server behind).
pub struct Server {
    child: Child,
    pub base: String,
}

impl Server {
    pub fn start(extra: &[&str]) -> Server {
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
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
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

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call("POST", path, Some(&body.to_string()))
    }

    /// `host:port`, for raw sockets.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// SIGTERM, then the exit status and what it wrote to stderr.
    pub fn stop(self) -> (ExitStatus, String) {
        let (status, err, _) = self.stop_within(Duration::from_secs(120));
        (status, err)
    }

    /// SIGTERM, then the exit status, stderr and how long the exit took; panics (and
    /// kills the server) if it is still running after `limit`.
    pub fn stop_within(mut self, limit: Duration) -> (ExitStatus, String, Duration) {
        let pid = self.child.id() as libc::pid_t;
        let t0 = Instant::now();
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if t0.elapsed() > limit {
                panic!("still running {limit:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let took = t0.elapsed();
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).unwrap();
        }
        (status, err, took)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An error answer: the status expected and a message containing `says`.
pub fn assert_error(got: (u16, Value), status: u16, says: &str) {
    let (s, v) = got;
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {v}"));
    assert_eq!(s, status, "{msg}");
    assert!(msg.contains(says), "{msg:?} does not say {says:?}");
}
