//! The prefix cache changes no answer: the demo model ranks and writes exactly the same
//! with it as without it (same items, same order, same scores to the bit), for new users,
//! returning users whose history grew, requests in words (whose sentence vector enters at
//! the prompt's last token), and repeated requests; and it does reuse work.

use std::path::Path;

use sidrec::decode::{Engine, Format, GenConfig, Mode, Request};
use sidrec::model::packed::WeightFormat;

fn demo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"))
}

/// Seeded histories; every third one repeats the previous with an item more (a returning
/// user), and the last request repeats the first.
fn requests(items: usize) -> Vec<Request> {
    let mut x = 0x2545_f491_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % items as u64) as u32
    };
    let mut out: Vec<Request> = Vec::new();
    for i in 0..30 {
        let history = match (i % 3, out.last()) {
            (2, Some(prev)) => {
                let mut h = prev.history.clone();
                h.push(next());
                h
            }
            _ => (0..1 + next() as usize % 5).map(|_| next()).collect(),
        };
        out.push(Request {
            history,
            k: 10,
            ..Default::default()
        });
    }
    out.push(out[0].clone());
    // Requests in words (their sentence vector goes in at the prompt's last token), with
    // and without a history, each asked twice.
    for (i, query) in ["something light-hearted and silly", "a movie about ghosts"]
        .iter()
        .enumerate()
    {
        for history in [Vec::new(), out[i].history.clone()] {
            let r = Request {
                query: query.to_string(),
                history,
                k: 10,
                ..Default::default()
            };
            out.push(r.clone());
            out.push(r);
        }
    }
    out
}

#[test]
fn cached_prefixes_give_the_answers_of_full_passes() {
    for format in [WeightFormat::F32, WeightFormat::Int8] {
        let cached = Engine::load(demo()).unwrap().with_weights(format).unwrap();
        let plain = Engine::load(demo())
            .unwrap()
            .with_weights(format)
            .unwrap()
            .with_prefix_cache(0);
        assert!(plain.prefix_stats().is_none());
        let reqs = requests(cached.catalog().items.len());
        for (i, r) in reqs.iter().enumerate() {
            let a = cached.rank(r).unwrap();
            let b = plain.rank(r).unwrap();
            let key = |h: &[sidrec::decode::Hit]| -> Vec<(u32, u32)> {
                h.iter().map(|h| (h.item, h.score.to_bits())).collect()
            };
            assert_eq!(key(&a), key(&b), "{format} request {i}: {:?}", r.history);
        }
        let stats = cached.prefix_stats().unwrap();
        assert!(stats.hits >= reqs.len() as u64 - 1, "{stats:?}");
        assert!(stats.reused_tokens > stats.computed_tokens / 2, "{stats:?}");
        // Text with items: generation starts from the cache too.
        let r = Request {
            mode: Mode::Recommend,
            format: Format::Both,
            history: reqs[3].history.clone(),
            k: 3,
            ..Default::default()
        };
        let cfg = GenConfig {
            max_tokens: 24,
            ..Default::default()
        };
        let a = cached.generate(&r, &cfg).unwrap();
        let _ = cached.generate(&r, &cfg).unwrap();
        let b = plain.generate(&r, &cfg).unwrap();
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{format}");
    }
}
