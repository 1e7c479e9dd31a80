//! GGUF loading and model-directory I/O, against the real SmolLM2-135M-Instruct GGUF
//! (fetched by `scripts/fetch-assets.sh`).
//!
//! The end-to-end test converts the GGUF to a Hugging Face directory, loads that with
//! candle's stock Llama (independent of sidrec's own model code) and checks that greedy
//! decoding agrees with candle's quantized GGUF Llama. That agreement is what shows the
//! q/k un-permutation is right: with the GGUF row order left as is, the f32 model's
//! rotate-half RoPE mixes the wrong dimensions and its output is garbage.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use candle_transformers::models::quantized_llama::ModelWeights;
use sidrec::model::gguf::{permute_qk, unpermute_qk, GgufModel, ModelIoError};
use sidrec::model::hfdir::{self, check_sid_map, sha256_file, HfDir, Sidecar};
use tokenizers::Tokenizer;

const CHAT_PROMPT: &str =
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
/// Tokens decoded by each path; enough for a short answer.
const GEN_TOKENS: usize = 12;
/// How many leading tokens the f32 and the quantized paths must agree on (see
/// `converted_model_matches_quantized_gguf`).
const MATCH_TOKENS: usize = 8;

fn gguf_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.is_file() {
        panic!(
            "{} is missing: run scripts/fetch-assets.sh to fetch the test assets",
            p.display()
        );
    }
    p
}

fn model() -> &'static GgufModel {
    static M: OnceLock<GgufModel> = OnceLock::new();
    M.get_or_init(|| GgufModel::open(gguf_path()).unwrap())
}

fn tokenizer() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| model().tokenizer().unwrap())
}

fn ids(text: &str) -> Vec<u32> {
    tokenizer().encode(text, false).unwrap().get_ids().to_vec()
}

fn pieces(text: &str) -> Vec<String> {
    tokenizer()
        .encode(text, false)
        .unwrap()
        .get_tokens()
        .to_vec()
}

#[test]
fn metadata_is_smollm2_135m() {
    let m = model().metadata();
    assert_eq!(m.architecture, "llama");
    assert_eq!(m.block_count, 30);
    assert_eq!(m.embedding_length, 576);
    assert_eq!(m.feed_forward_length, 1536);
    assert_eq!(m.head_count, 9);
    assert_eq!(m.head_count_kv, 3);
    assert_eq!(m.head_dim(), 64);
    assert_eq!(m.rope_dimension_count, 64);
    assert_eq!(m.vocab_size, 49152);
    assert_eq!(m.context_length, 8192);
    assert_eq!(m.rope_freq_base, 100_000.0);
    assert!((m.rms_norm_eps - 1e-5).abs() < 1e-9);
    assert!(m.tie_word_embeddings);
    assert_eq!(m.bos_token_id, Some(1));
    assert_eq!(m.eos_token_id, Some(2));
    assert!(m.chat_template.as_deref().unwrap().contains("<|im_start|>"));

    let cfg = model().hf_config();
    assert_eq!(cfg.hidden_size, 576);
    assert_eq!(cfg.num_key_value_heads, 3);
    assert_eq!(cfg.rope_theta, 100_000.0);
    assert!(cfg.tie_word_embeddings);
}

#[test]
fn all_tensors_present_with_expected_shapes() {
    let infos = model().tensor_infos();
    // 9 per layer, the embeddings and the final norm; tied, so no output.weight.
    assert_eq!(infos.len(), 30 * 9 + 2);
    assert!(!infos.contains_key("output.weight"));
    let shape = |n: &str| {
        infos
            .get(n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .0
            .clone()
    };
    assert_eq!(shape("token_embd.weight"), [49152, 576]);
    assert_eq!(shape("output_norm.weight"), [576]);
    for i in 0..30 {
        let s = |n: &str| shape(&format!("blk.{i}.{n}.weight"));
        assert_eq!(s("attn_q"), [576, 576]);
        assert_eq!(s("attn_k"), [192, 576]);
        assert_eq!(s("attn_v"), [192, 576]);
        assert_eq!(s("attn_output"), [576, 576]);
        assert_eq!(s("ffn_gate"), [1536, 576]);
        assert_eq!(s("ffn_up"), [1536, 576]);
        assert_eq!(s("ffn_down"), [576, 1536]);
        assert_eq!(s("attn_norm"), [576]);
        assert_eq!(s("ffn_norm"), [576]);
    }
}

#[test]
fn permutation_matches_llama_cpp_and_round_trips() {
    // Two heads of size 4, one input column holding the row index: llama.cpp's
    // converter orders each head's rows (0, 2, 1, 3), i.e. halves interleaved.
    let w = Tensor::arange(0f32, 8., &Device::Cpu)
        .unwrap()
        .reshape((8, 1))
        .unwrap();
    let p = permute_qk(&w, 2).unwrap();
    let rows: Vec<f32> = p.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(rows, [0., 2., 1., 3., 4., 6., 5., 7.]);
    let back: Vec<f32> = unpermute_qk(&p, 2)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(back, [0., 1., 2., 3., 4., 5., 6., 7.]);

    // A realistic shape: 3 heads of 64 rows, 5 columns.
    let w = Tensor::randn(0f32, 1., (192, 5), &Device::Cpu).unwrap();
    let rt = unpermute_qk(&permute_qk(&w, 3).unwrap(), 3).unwrap();
    assert_eq!(
        w.to_vec2::<f32>().unwrap(),
        rt.to_vec2::<f32>().unwrap(),
        "unpermute_qk must invert permute_qk"
    );
    assert!(
        unpermute_qk(&w, 5).is_err(),
        "192 rows are not 5 even heads"
    );
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn tokenizer_round_trips_ascii_unicode_and_digits() {
    let tok = tokenizer();
    assert_eq!(tok.get_vocab_size(true), 49152);
    for text in [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "  leading spaces, tabs\tand\nnew lines\n\n",
        "Café, naïve, Straße, Ελληνικά, Привет, 日本語のテキスト, emoji 😀👍🏽",
        "In 2024 the order #12345 cost $3.50 (or 1,000,000 yen).",
    ] {
        let enc = tok.encode(text, false).unwrap();
        let dec = tok.decode(enc.get_ids(), false).unwrap();
        assert_eq!(dec, text);
        assert!(
            enc.get_ids().iter().all(|&i| i >= 17),
            "{text:?}: no special ids"
        );
    }
    // The "smollm" pre-tokenizer splits numbers into single digits.
    assert_eq!(pieces("12345"), ["1", "2", "3", "4", "5"]);
    assert_eq!(pieces(" 2024"), ["Ġ", "2", "0", "2", "4"]);
}

#[test]
fn chat_markers_are_single_special_tokens() {
    let tok = tokenizer();
    assert_eq!(ids("<|im_start|>"), [1]);
    assert_eq!(ids("<|im_end|>"), [2]);
    assert_eq!(ids("<|endoftext|>"), [0]);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    // Special tokens are dropped when decoding with skip_special_tokens.
    let enc = tok.encode("<|im_start|>hi<|im_end|>", false).unwrap();
    assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "hi");
    assert_eq!(
        tok.decode(enc.get_ids(), false).unwrap(),
        "<|im_start|>hi<|im_end|>"
    );
    // No BOS is added: SmolLM2 has add_bos_token = false.
    assert_eq!(tok.encode("hi", true).unwrap().get_ids(), ids("hi"));
}

#[test]
fn chat_prompt_tokenizes_to_expected_pieces() {
    let p = pieces(CHAT_PROMPT);
    assert_eq!(
        p,
        [
            "<|im_start|>",
            "user",
            "Ċ",
            "What",
            "Ġis",
            "Ġthe",
            "Ġcapital",
            "Ġof",
            "ĠFrance",
            "?",
            "<|im_end|>",
            "Ċ",
            "<|im_start|>",
            // The vocabulary has no "assistant" token.
            "ass",
            "istant",
            "Ċ",
        ]
    );
    let ids = ids(CHAT_PROMPT);
    assert_eq!(ids[..3], [1, 4093, 198]);
    assert_eq!(ids[10], 2);
    // The generation prompt "<|im_start|>assistant\n", as SmolLM2's own tokenizer
    // encodes it.
    assert_eq!(ids[12..], [1, 520, 9531, 198]);
    assert_eq!(tokenizer().decode(&ids, false).unwrap(), CHAT_PROMPT);
}

// ---------------------------------------------------------------- header errors

/// Writes a GGUF holding `metadata` and one tiny f32 tensor named `token_embd.weight`.
fn tiny_gguf(path: &Path, metadata: &[(&str, gguf_file::Value)]) {
    let t = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
    let q = candle_core::quantized::QTensor::quantize(&t, candle_core::quantized::GgmlDType::F32)
        .unwrap();
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &[("token_embd.weight", &q)]).unwrap();
}

#[test]
fn non_llama_and_incomplete_headers_are_clear_errors() {
    use gguf_file::Value;
    let dir = tempfile::tempdir().unwrap();

    let qwen = dir.path().join("qwen.gguf");
    tiny_gguf(
        &qwen,
        &[("general.architecture", Value::String("qwen2".into()))],
    );
    let err = GgufModel::open(&qwen).unwrap_err();
    assert!(matches!(err, ModelIoError::Architecture { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("qwen.gguf") && msg.contains("qwen2"), "{msg}");

    let partial = dir.path().join("partial.gguf");
    tiny_gguf(
        &partial,
        &[
            ("general.architecture", Value::String("llama".into())),
            ("llama.block_count", Value::U32(1)),
        ],
    );
    let msg = GgufModel::open(&partial).unwrap_err().to_string();
    assert!(
        msg.contains("partial.gguf") && msg.contains("llama.embedding_length"),
        "{msg}"
    );

    let garbage = dir.path().join("garbage.gguf");
    fs::write(&garbage, b"definitely not a gguf file").unwrap();
    let msg = GgufModel::open(&garbage).unwrap_err().to_string();
    assert!(msg.contains("garbage.gguf"), "{msg}");
}

/// A complete one-layer Llama GGUF with f32 tensors (hidden 4, 2 heads of 2, 1 kv head,
/// feed-forward 8, a 7-token vocabulary) and BOS added by the tokenizer. Returns the
/// tensors written, by GGUF name.
fn tiny_llama_gguf(path: &Path) -> HashMap<String, Tensor> {
    use gguf_file::Value;
    let strs = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String(s.to_string())).collect());
    let md = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(1)),
        ("llama.context_length", Value::U32(32)),
        ("llama.embedding_length", Value::U32(4)),
        ("llama.feed_forward_length", Value::U32(8)),
        ("llama.attention.head_count", Value::U32(2)),
        ("llama.attention.head_count_kv", Value::U32(1)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("llama.rope.dimension_count", Value::U32(2)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt-2".into())),
        (
            "tokenizer.ggml.tokens",
            strs(&["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa"]),
        ),
        ("tokenizer.ggml.merges", strs(&["a b", "Ġ a"])),
        (
            "tokenizer.ggml.token_type",
            Value::Array([3, 3, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(true)),
    ];
    let shapes: [(&str, &[usize]); 11] = [
        ("token_embd.weight", &[7, 4]),
        ("output.weight", &[7, 4]),
        ("output_norm.weight", &[4]),
        ("blk.0.attn_norm.weight", &[4]),
        ("blk.0.ffn_norm.weight", &[4]),
        ("blk.0.attn_q.weight", &[4, 4]),
        ("blk.0.attn_k.weight", &[2, 4]),
        ("blk.0.attn_v.weight", &[2, 4]),
        ("blk.0.attn_output.weight", &[4, 4]),
        ("blk.0.ffn_gate.weight", &[8, 4]),
        ("blk.0.ffn_up.weight", &[8, 4]),
    ];
    let mut tensors: HashMap<String, Tensor> = shapes
        .iter()
        .map(|(n, s)| {
            let t = Tensor::randn(0f32, 1., *s, &Device::Cpu).unwrap();
            (n.to_string(), t)
        })
        .collect();
    tensors.insert(
        "blk.0.ffn_down.weight".into(),
        Tensor::randn(0f32, 1., (4, 8), &Device::Cpu).unwrap(),
    );
    let q: Vec<(String, candle_core::quantized::QTensor)> = tensors
        .iter()
        .map(|(n, t)| {
            let q = candle_core::quantized::QTensor::quantize(
                t,
                candle_core::quantized::GgmlDType::F32,
            )
            .unwrap();
            (n.clone(), q)
        })
        .collect();
    let qrefs: Vec<(&str, &candle_core::quantized::QTensor)> =
        q.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mdrefs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &mdrefs, &qrefs).unwrap();
    tensors
}

#[test]
fn tiny_llama_gguf_dequantizes_renames_and_tokenizes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let src = tiny_llama_gguf(&path);
    let m = GgufModel::open(&path).unwrap();
    assert!(!m.metadata().tie_word_embeddings);
    assert_eq!(m.metadata().rope_freq_base, 10_000.0, "llama.cpp's default");

    let t = m.dequantize_all().unwrap();
    assert_eq!(t.len(), 12);
    let same = |hf: &str, g: &Tensor| {
        assert_eq!(
            t[hf].to_vec2::<f32>().unwrap(),
            g.to_vec2::<f32>().unwrap(),
            "{hf}"
        )
    };
    same("lm_head.weight", &src["output.weight"]);
    same("model.embed_tokens.weight", &src["token_embd.weight"]);
    same(
        "model.layers.0.mlp.down_proj.weight",
        &src["blk.0.ffn_down.weight"],
    );
    same(
        "model.layers.0.self_attn.v_proj.weight",
        &src["blk.0.attn_v.weight"],
    );
    same(
        "model.layers.0.self_attn.q_proj.weight",
        &unpermute_qk(&src["blk.0.attn_q.weight"], 2).unwrap(),
    );
    same(
        "model.layers.0.self_attn.k_proj.weight",
        &unpermute_qk(&src["blk.0.attn_k.weight"], 1).unwrap(),
    );
    assert_eq!(
        t["model.layers.0.post_attention_layernorm.weight"]
            .to_vec1::<f32>()
            .unwrap(),
        src["blk.0.ffn_norm.weight"].to_vec1::<f32>().unwrap()
    );

    // add_bos_token = true: a template processor prepends <s>.
    let tok = m.tokenizer().unwrap();
    assert_eq!(tok.encode("ab a", true).unwrap().get_ids(), [0, 4, 6]);
    assert_eq!(tok.encode("ab a", false).unwrap().get_ids(), [4, 6]);
    assert_eq!(tok.decode(&[0, 4, 6], true).unwrap(), "ab a");
}

// ---------------------------------------------------------------- end to end

/// Greedy decoding with candle's stock f32 Llama from a Hugging Face directory.
fn generate_f32(dir: &Path, prompt: &[u32], n: usize, eos: u32) -> (Vec<u32>, f64) {
    let cfg: LlamaConfig =
        serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let cfg = cfg.into_config(false);
    let dev = Device::Cpu;
    let bytes = fs::read(dir.join("model.safetensors")).unwrap();
    let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, &dev).unwrap();
    let llama = Llama::load(vb, &cfg).unwrap();
    let mut cache = Cache::new(true, DType::F32, &cfg, &dev).unwrap();
    greedy(prompt, n, eos, |x, pos| {
        llama.forward(x, pos, &mut cache).unwrap()
    })
}

/// Greedy decoding with candle's quantized Llama straight from the GGUF.
fn generate_quantized(path: &Path, prompt: &[u32], n: usize, eos: u32) -> (Vec<u32>, f64) {
    let mut f = fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut weights = ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    greedy(prompt, n, eos, |x, pos| weights.forward(x, pos).unwrap())
}

/// Feeds the prompt, then one token at a time; returns the new tokens and the speed of
/// the token-at-a-time part (tokens per second, prompt processing excluded).
fn greedy(
    prompt: &[u32],
    n: usize,
    eos: u32,
    mut forward: impl FnMut(&Tensor, usize) -> Tensor,
) -> (Vec<u32>, f64) {
    let mut out = Vec::new();
    let mut input = prompt.to_vec();
    let mut pos = 0;
    let mut decode_start = None;
    while out.len() < n {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = forward(&x, pos).squeeze(0).unwrap();
        let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        decode_start.get_or_insert_with(Instant::now);
        pos += input.len();
        out.push(next);
        if next == eos {
            break;
        }
        input = vec![next];
    }
    let secs = decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let speed = (out.len() - 1) as f64 / secs.max(1e-9);
    (out, speed)
}

#[test]
fn converted_model_matches_quantized_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("smollm2-hf");
    let t0 = Instant::now();
    let cfg = hfdir::convert(gguf_path(), &out, false).unwrap();
    eprintln!("convert: {:.2}s", t0.elapsed().as_secs_f64());
    assert_eq!(cfg.num_hidden_layers, 30);

    // The directory reads back: tied, so no lm_head; the saved tokenizer is the same.
    let dir = HfDir::load(&out).unwrap();
    assert_eq!(dir.config["model_type"], "llama");
    assert_eq!(dir.config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(dir.config["torch_dtype"], "float32");
    assert_eq!(dir.tensors.len(), 30 * 9 + 2);
    assert!(!dir.tensors.contains_key("lm_head.weight"));
    assert_eq!(
        dir.tensors["model.layers.0.self_attn.k_proj.weight"].dims(),
        [192, 576]
    );
    assert_eq!(dir.tensors["model.embed_tokens.weight"].dtype(), DType::F32);
    let prompt = ids(CHAT_PROMPT);
    assert_eq!(
        dir.tokenizer.encode(CHAT_PROMPT, false).unwrap().get_ids(),
        prompt
    );
    assert!(dir.tokenizer_config.as_ref().unwrap()["chat_template"]
        .as_str()
        .unwrap()
        .contains("<|im_start|>"));
    let gen: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gen["bos_token_id"], 1);
    assert_eq!(gen["eos_token_id"], 2);
    drop(dir);

    let eos = 2;
    let (f32_ids, f32_speed) = generate_f32(&out, &prompt, GEN_TOKENS, eos);
    let (q_ids, q_speed) = generate_quantized(&gguf_path(), &prompt, GEN_TOKENS, eos);
    let text = tokenizer().decode(&f32_ids, true).unwrap();
    let q_text = tokenizer().decode(&q_ids, true).unwrap();
    eprintln!("f32 ({f32_speed:.1} tok/s): {text:?} {f32_ids:?}");
    eprintln!("q4_1 ({q_speed:.1} tok/s): {q_text:?} {q_ids:?}");

    // The quantized path also quantizes activations (q8_1) inside its matmuls, so the
    // logits differ slightly and a near-tie could eventually break the other way. Here
    // the whole answer (8 tokens, end of turn included) agrees; MATCH_TOKENS is that
    // floor. Without the q/k un-permutation only the first token ("The") agrees.
    let n = MATCH_TOKENS.min(f32_ids.len()).min(q_ids.len());
    assert!(n >= MATCH_TOKENS, "too few tokens: {f32_ids:?} / {q_ids:?}");
    assert_eq!(f32_ids[..n], q_ids[..n], "{text:?} vs {q_text:?}");
    assert!(text.contains("Paris"), "{text:?}");
}

// ---------------------------------------------------------------- directories

/// A tiny tied "model" with the real tokenizer, for directory round trips.
fn tiny_dir(sidecar: Option<Sidecar>) -> HfDir {
    let dev = Device::Cpu;
    let emb = Tensor::randn(0f32, 1., (6, 4), &dev).unwrap();
    let mut tensors = HashMap::new();
    tensors.insert("model.embed_tokens.weight".to_string(), emb.clone());
    tensors.insert("lm_head.weight".to_string(), emb);
    tensors.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(4, DType::F32, &dev).unwrap(),
    );
    HfDir {
        config: serde_json::json!({
            "model_type": "llama", "tie_word_embeddings": true,
            "bos_token_id": 1, "eos_token_id": 2
        }),
        tensors,
        tokenizer: tokenizer().clone(),
        tokenizer_config: None,
        sidecar,
    }
}

fn sidecar(sha: &str) -> Sidecar {
    Sidecar {
        history_titles: true,
        sids_sha256: sha.to_string(),
        artifacts: "runs/ml-1m".to_string(),
        stage: "sft".to_string(),
        prompts_version: "1".to_string(),
        sid_tokens: 1029,
        sid_token_offset: 49152,
        sequence: false,
        soon: false,
        recipe: String::new(),
        ranking: Default::default(),
        soft_prompt: None,
    }
}

#[test]
fn hf_dir_round_trip_drops_tied_lm_head() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let d = tiny_dir(Some(sidecar(&"ab".repeat(32))));
    d.save(&out, false).unwrap();
    let back = HfDir::load(&out).unwrap();
    assert_eq!(back.config, d.config);
    assert_eq!(back.tensors.len(), 2, "lm_head.weight is tied and left out");
    assert_eq!(
        back.tensors["model.embed_tokens.weight"]
            .to_vec2::<f32>()
            .unwrap(),
        d.tensors["model.embed_tokens.weight"]
            .to_vec2::<f32>()
            .unwrap()
    );
    assert_eq!(back.sidecar, d.sidecar);
    // Every file is readable like any other the user creates: the weights and the sidecar
    // pass through private temporary files, and must not stay private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let reference = out.join("reference");
        fs::write(&reference, "x").unwrap();
        let want = fs::metadata(&reference).unwrap().permissions().mode() & 0o777;
        fs::remove_file(&reference).unwrap();
        for f in fs::read_dir(&out).unwrap() {
            let f = f.unwrap();
            let mode = f.metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{:?}: {mode:o}", f.file_name());
        }
    }
    assert_eq!(
        back.tokenizer.encode(CHAT_PROMPT, false).unwrap().get_ids(),
        ids(CHAT_PROMPT)
    );
    let gen: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );

    // Saving again needs overwrite; with it, the directory is replaced.
    let err = d.save(&out, false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelIoError::Refused(sidrec::atomic::Refusal::Exists(_))
        ),
        "{err:?}"
    );
    tiny_dir(None).save(&out, true).unwrap();
    assert!(!out.join("sidrec.json").exists());
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

#[test]
fn sidecar_round_trip_and_sid_map_check() {
    let tmp = tempfile::tempdir().unwrap();
    let sids = tmp.path().join("sids.jsonl");
    fs::write(
        &sids,
        "{\"id\":\"1\",\"type\":\"movie\",\"codes\":[1,2],\"sid\":\"<movie><a_1><b_2>\"}\n",
    )
    .unwrap();
    let sha = sha256_file(&sids).unwrap();
    assert_eq!(sha.len(), 64);

    let model_dir = tmp.path().join("model");
    fs::create_dir(&model_dir).unwrap();
    let err = check_sid_map(&model_dir, &sids).unwrap_err();
    assert!(err.to_string().contains("sidrec.json"), "{err}");

    let s = sidecar(&sha);
    s.write(&model_dir).unwrap();
    assert_eq!(Sidecar::read(&model_dir).unwrap(), s);
    check_sid_map(&model_dir, &sids).unwrap();

    // Another SID map: the error names both checksums and both paths.
    let other = tmp.path().join("other-sids.jsonl");
    fs::write(
        &other,
        "{\"id\":\"1\",\"type\":\"movie\",\"codes\":[3,4],\"sid\":\"<movie><a_3><b_4>\"}\n",
    )
    .unwrap();
    let other_sha = sha256_file(&other).unwrap();
    let err = check_sid_map(&model_dir, &other).unwrap_err();
    assert!(
        matches!(err, ModelIoError::SidMapMismatch { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    for part in [
        sha.as_str(),
        other_sha.as_str(),
        "other-sids.jsonl",
        "runs/ml-1m",
        &model_dir.display().to_string(),
    ] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }

    // A malformed sidecar is reported with its path.
    fs::write(model_dir.join("sidrec.json"), "{\"sids_sha256\": \"xyz\"}").unwrap();
    let msg = Sidecar::read(&model_dir).unwrap_err().to_string();
    assert!(msg.contains("sidrec.json"), "{msg}");
}

/// Entries of `dir` that look like temporary or set-aside directories.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".sidrec-"))
        .collect()
}

#[test]
fn convert_is_atomic() {
    let tmp = tempfile::tempdir().unwrap();

    // An existing output without overwrite: refused, untouched.
    let out = tmp.path().join("exists");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = hfdir::convert(gguf_path(), &out, false).unwrap_err();
    assert!(
        matches!(
            err,
            ModelIoError::Refused(sidrec::atomic::Refusal::Exists(_))
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("exists"), "{err}");
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");

    // A bad input fails with nothing written, and an existing output survives it even
    // with overwrite.
    let bad = tmp.path().join("bad.gguf");
    fs::write(&bad, b"GGUF but not really").unwrap();
    let fresh = tmp.path().join("fresh");
    let err = hfdir::convert(&bad, &fresh, false).unwrap_err();
    assert!(err.to_string().contains("bad.gguf"), "{err}");
    assert!(!fresh.exists());
    hfdir::convert(&bad, &out, true).unwrap_err();
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}
