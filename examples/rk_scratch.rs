use sidrec::kmeans::{Init, Rows};
use sidrec::quantize::*;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let bytes = std::fs::read(&a[1]).unwrap();
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let data: Vec<f32> = bytes[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let d = 384;
    let n = data.len() / d;
    let init = match a.get(3).map(String::as_str) {
        Some("random") => Init::Random,
        _ => Init::PlusPlus,
    };
    let cfg = QuantizeConfig {
        assign: a[2].parse().unwrap(),
        init,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let q = quantize(Rows::new(&data, n, d), &vec![0; n], &cfg).unwrap();
    println!(
        "{:.2}s {}",
        t.elapsed().as_secs_f64(),
        serde_json::to_string(&q.report).unwrap()
    );
}
