//! Requests decoded together share forward passes and get exactly the answers they get
//! alone: sixteen threads ask the demo model at once, through one batching engine, and
//! every ranking (items, order, scores to the bit) and generated answer equals a plain
//! engine's, one request at a time.

use std::path::Path;
use std::sync::Barrier;

use sidrec::decode::{Engine, Format, GenConfig, Hit, Mode, Request};

fn demo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"))
}

fn request(i: usize, items: usize) -> Request {
    let mut x = 0x51_7cc1_b727_u64 + i as u64 * 0x9e37_79b9;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % items as u64) as u32
    };
    let len = 1 + next() as usize % 6;
    Request {
        history: (0..len).map(|_| next()).collect(),
        // A few ask in words too, some with more beams than others.
        query: if i.is_multiple_of(5) {
            "something light-hearted and silly".into()
        } else {
            String::new()
        },
        beams: Some(10 + (i % 3) * 5),
        k: 10,
        ..Default::default()
    }
}

/// A ranking as (item, score bits): equal only when identical to the bit.
type Ranked = Vec<(u32, u32)>;

fn key(hits: &[Hit]) -> Ranked {
    hits.iter().map(|h| (h.item, h.score.to_bits())).collect()
}

#[test]
fn batched_requests_get_the_answers_they_get_alone() {
    let plain = Engine::load(demo()).unwrap().with_prefix_cache(0);
    let shared = Engine::load(demo()).unwrap().with_batching(true);
    let items = plain.catalog().items.len();
    let threads = 16;
    let per_thread = 3;
    let want: Vec<Ranked> = (0..threads * per_thread)
        .map(|i| key(&plain.rank(&request(i, items)).unwrap()))
        .collect();
    let gen_req = |i: usize| Request {
        mode: Mode::Recommend,
        format: Format::Both,
        k: 3,
        ..request(i, items)
    };
    let cfg = GenConfig {
        max_tokens: 16,
        ..Default::default()
    };
    let want_gen: Vec<String> = (0..threads)
        .map(|i| format!("{:?}", plain.generate(&gen_req(i), &cfg).unwrap()))
        .collect();
    let start = Barrier::new(threads);
    let got: Vec<(Vec<Ranked>, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (shared, start, cfg) = (&shared, &start, &cfg);
                s.spawn(move || {
                    start.wait();
                    let ranks = (0..per_thread)
                        .map(|j| key(&shared.rank(&request(t * per_thread + j, items)).unwrap()))
                        .collect();
                    let text = format!("{:?}", shared.generate(&gen_req(t), cfg).unwrap());
                    (ranks, text)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, (ranks, text)) in got.iter().enumerate() {
        for (j, r) in ranks.iter().enumerate() {
            assert_eq!(r, &want[t * per_thread + j], "thread {t}, request {j}");
        }
        assert_eq!(text, &want_gen[t], "thread {t}, generated");
    }
    let stats = shared.batch_stats().unwrap();
    assert!(stats.jobs > stats.passes, "no pass was shared: {stats:?}");
    println!("{stats:?}");
}
