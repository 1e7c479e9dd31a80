//! `sidrec serve`'s connections under abuse, on the real binary over loopback: sockets
//! that hold half a request head, say nothing, dribble a header or stall in a body are
//! closed by the timeouts while other clients are answered, and SIGTERM finishes within
//! its deadline while such sockets are held.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
#[path = "common/server.rs"]
mod server;

use server::Server;

/// A request head cut off midway: no blank line, so the server waits for more.
const HALF_HEAD: &[u8] = b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty";

/// Reads until the server closes the socket (EOF or a reset) or `deadline` passes;
/// returns what it sent, or `None` if the socket was still open at the deadline.
fn read_until_closed(c: &mut TcpStream, deadline: Instant) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return None
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

/// Fifty sockets that send half a head and hold, fifty that connect and say nothing, one
/// that dribbles a header a byte at a time and one that stalls in its body: the others'
/// requests are all answered meanwhile, and the server closes every one of them by the
/// timeouts (the stalled body with a JSON 408).
#[test]
fn held_and_half_sent_sockets_are_closed_while_others_are_served() {
    let s = Server::start(&["--header-timeout", "1", "--idle-timeout", "2"]);
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..50 {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.write_all(HALF_HEAD).unwrap();
        held.push(c);
    }
    for _ in 0..50 {
        held.push(TcpStream::connect(s.addr()).unwrap());
    }
    let mut stalled = TcpStream::connect(s.addr()).unwrap();
    stalled
        .write_all(
            b"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\n\r\n{\"history\": [",
        )
        .unwrap();

    // Others are served while all of those are held.
    std::thread::scope(|sc| {
        for t in 0..3 {
            let s = &s;
            sc.spawn(move || {
                for n in 0..8 {
                    let h = ["m1", "m3", "p1"][(t + n) % 3];
                    let (st, r) = s.post("/v1/recommend", json!({"history": [h], "k": 2}));
                    assert_eq!(st, 200, "{r}");
                    assert_eq!(r["items"].as_array().unwrap().len(), 2, "{r}");
                }
            });
        }
    });

    // A header sent a byte every 100 ms keeps bytes moving, so only the header timeout
    // (1 s in all, not per byte) can end it.
    let mut dribble = TcpStream::connect(s.addr()).unwrap();
    dribble
        .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let t0 = Instant::now();
    let mut cut_off = false;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(100));
        if dribble.write_all(b"a").is_err() {
            cut_off = true;
            break;
        }
    }
    assert!(
        cut_off || read_until_closed(&mut dribble, Instant::now()).is_some(),
        "a dribbled header was still accepted after {:?}",
        t0.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());

    let deadline = Instant::now() + Duration::from_secs(15);
    for (i, c) in held.iter_mut().enumerate() {
        assert!(
            read_until_closed(c, deadline).is_some(),
            "held socket {i} is still open"
        );
    }
    let answer = read_until_closed(&mut stalled, deadline).expect("the stalled body's socket");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert!(
        v["error"].as_str().unwrap().contains("did not arrive"),
        "{v}"
    );

    // Still serving.
    assert_eq!(s.call("GET", "/healthz", None).0, 200);
    let (status, err) = s.stop();
    assert!(status.success(), "{status:?}: {err}");
}

/// With a long header timeout, the idle timeout alone closes a keep-alive connection that
/// goes quiet after its answer, and one that never says anything.
#[test]
fn quiet_connections_are_closed_after_the_idle_timeout() {
    let s = Server::start(&["--header-timeout", "120", "--idle-timeout", "1"]);
    let mut silent = TcpStream::connect(s.addr()).unwrap();
    let mut kept = TcpStream::connect(s.addr()).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(15);
    let answer = read_until_closed(&mut kept, deadline).expect("the kept-alive socket");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        read_until_closed(&mut silent, deadline).is_some(),
        "the silent socket"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (status, err) = s.stop();
    assert!(status.success(), "{status:?}: {err}");
}

/// SIGTERM while sockets hold half a head (and the timeouts are long): requests in
/// flight get the shutdown deadline, then the server exits anyway, cleanly.
#[test]
fn sigterm_finishes_within_its_deadline_while_sockets_are_held() {
    let s = Server::start(&[
        "--header-timeout",
        "120",
        "--idle-timeout",
        "120",
        "--shutdown-timeout",
        "2",
    ]);
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..20 {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.write_all(HALF_HEAD).unwrap();
        held.push(c);
        held.push(TcpStream::connect(s.addr()).unwrap());
    }
    let (st, r) = s.post("/v1/recommend", json!({"history": ["m1"], "k": 2}));
    assert_eq!(st, 200, "{r}");
    // Let the server take in every held head before the signal.
    std::thread::sleep(Duration::from_millis(300));
    let (status, err, took) = s.stop_within(Duration::from_secs(2 + 5));
    assert!(status.success(), "{status:?}: {err}");
    assert!(err.contains("stopped"), "{err}");
    assert!(err.contains("still open"), "{err}");
    eprintln!(
        "exited {took:?} after SIGTERM with {} sockets held",
        held.len()
    );
}
