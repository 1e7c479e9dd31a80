//! The language model: a Llama-family decoder written for training and for decoding.
//!
//! - `config`: the Hugging Face `config.json` of a Llama-family model;
//! - `ops`: differentiable softmax, RMSNorm and RoPE (candle's fused CPU kernels for these
//!   record no gradient);
//! - `llama`: the decoder (full-sequence forward for training, KV-cached forward for
//!   decoding, LoRA adapters, vocabulary extension);
//! - `gguf`: loading GGUF checkpoints (dequantised to f32) and their tokenizer;
//! - `hfdir`: reading and writing Hugging Face model directories;
//! - `soft_prompt`: sentence-encoder vectors read as input vectors (request, taste);
//! - `bpe`: byte-level BPE trained on catalog and prompt texts, for from-scratch models.

pub mod bpe;
pub mod config;
pub mod gguf;
pub mod hfdir;
pub mod items;
pub mod llama;
pub mod ops;
pub mod packed;
pub mod skinny;
pub mod soft_prompt;
