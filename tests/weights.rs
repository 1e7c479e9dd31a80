//! Decoding with the demo model's matrices packed in bf16 and int8 (`--weights`): the
//! logits stay within a stated distance of f32's, and the top-10 of the same requests
//! mostly agree. The bounds are the accuracy cost the docs state.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use sidrec::decode::{Engine, Request};
use sidrec::model::llama::KvCache;
use sidrec::model::packed::WeightFormat;

fn demo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo"))
}

fn engines() -> &'static [(WeightFormat, Engine)] {
    static E: OnceLock<Vec<(WeightFormat, Engine)>> = OnceLock::new();
    E.get_or_init(|| {
        [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Int8]
            .into_iter()
            .map(|f| (f, Engine::load(demo()).unwrap().with_weights(f).unwrap()))
            .collect()
    })
}

/// Seeded histories of 1 to 6 catalog items.
fn histories(n: usize, items: usize) -> Vec<Vec<u32>> {
    let mut x = 0x9e37_79b9_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|_| {
            let len = 1 + (next() % 6) as usize;
            (0..len).map(|_| (next() % items as u64) as u32).collect()
        })
        .collect()
}

/// Relative L2 distance of the packed model's prompt logits from f32's, and mean top-10
/// overlap with f32's items, over 40 requests.
#[test]
fn packed_weights_stay_close_to_f32() {
    let e = engines();
    let f32_engine = &e[0].1;
    let hist = histories(40, f32_engine.catalog().items.len());
    let reqs: Vec<Request> = hist
        .iter()
        .map(|h| Request {
            history: h.clone(),
            k: 10,
            ..Default::default()
        })
        .collect();
    let tops = |engine: &Engine| -> Vec<Vec<u32>> {
        reqs.iter()
            .map(|r| engine.rank(r).unwrap().iter().map(|h| h.item).collect())
            .collect()
    };
    let logits = |engine: &Engine, r: &Request| -> Tensor {
        let ids = engine.prompt_ids(r).unwrap();
        let t = Tensor::from_slice(&ids, (1, ids.len()), &Device::Cpu).unwrap();
        let mut cache = KvCache::new(engine.model().config());
        engine.model().forward_cached_last(&t, &mut cache).unwrap()
    };
    let want = tops(f32_engine);
    for (format, engine, max_err, min_overlap) in [
        (WeightFormat::Bf16, &e[1].1, 0.01, 0.95),
        (WeightFormat::Int8, &e[2].1, 0.01, 0.95),
    ] {
        let mut worst = 0f32;
        for r in &reqs[..10] {
            let (a, b) = (logits(f32_engine, r), logits(engine, r));
            let d = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
            let n = a.sqr().unwrap().sum_all().unwrap();
            let err = (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt();
            worst = worst.max(err);
        }
        let got = tops(engine);
        let overlap = want
            .iter()
            .zip(&got)
            .map(|(a, b)| a.iter().filter(|i| b.contains(i)).count() as f64 / a.len() as f64)
            .sum::<f64>()
            / want.len() as f64;
        println!("{format}: logits within {worst:.5} (relative L2), overlap@10 {overlap:.3}");
        assert!(worst < max_err, "{format}: logits {worst}");
        assert!(overlap >= min_overlap, "{format}: overlap@10 {overlap}");
    }
}

/// Packing while reading the file (what `--weights` does) gives the model that packing
/// after loading gives: the same rankings, to the bit.
#[test]
fn packed_while_read_equals_packed_after() {
    let after = &engines()[2].1;
    let read = Engine::load_weights(demo(), None, WeightFormat::Int8).unwrap();
    for h in histories(8, after.catalog().items.len()) {
        let r = Request {
            history: h,
            k: 10,
            ..Default::default()
        };
        let key = |e: &Engine| -> Vec<(u32, u32)> {
            e.rank(&r)
                .unwrap()
                .iter()
                .map(|h| (h.item, h.score.to_bits()))
                .collect()
        };
        assert_eq!(key(after), key(&read), "{:?}", r.history);
    }
}

/// A truncated weights file is refused with the tensor that runs past its end, whether
/// the weights are read as f32 or packed while read.
#[test]
fn truncated_weights_are_named() {
    use sidrec::model::hfdir::HfDir;
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(demo().join(f), tmp.path().join(f)).unwrap();
    }
    let weights = tmp.path().join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    for format in [WeightFormat::F32, WeightFormat::Int8] {
        let err = HfDir::load_packed(tmp.path(), format)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("truncated"),
            "{format}: {err}"
        );
    }
}
