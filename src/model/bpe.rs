//! A byte-level BPE tokenizer trained on the catalog and prompt texts, for models trained
//! from scratch (the `tiny` configs in `models/`).
//!
//! Byte-level, like GPT-2 and SmolLM2, so any text round-trips. SID tokens are not part of
//! the trained vocabulary: they are appended afterwards, exactly as they are appended to a
//! pretrained model's tokenizer, so both paths share one vocabulary-extension step.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, PreTokenizerWrapper, Tokenizer};

/// Special tokens of from-scratch models, in id order (ids 0..4): end of text, padding,
/// and the chat delimiters the prompts use (the same as SmolLM2's, so one prompt format
/// serves both).
pub const SPECIAL_TOKENS: [&str; 4] = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"];

/// Errors of tokenizer training.
#[derive(Debug, thiserror::Error)]
pub enum BpeError {
    #[error("tokenizer training: {0}")]
    Train(String),
    #[error("vocabulary size {0} is too small: byte-level BPE needs at least 256 + specials")]
    TooSmall(usize),
}

/// Trains a byte-level BPE with `vocab_size` entries (specials included) on `texts`.
/// Deterministic for the same texts in the same order.
pub fn train_bpe<S: AsRef<str> + Send>(
    texts: impl Iterator<Item = S> + Send,
    vocab_size: usize,
) -> Result<Tokenizer, BpeError> {
    if vocab_size < 256 + SPECIAL_TOKENS.len() {
        return Err(BpeError::TooSmall(vocab_size));
    }
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials.clone())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tok = Tokenizer::new(ModelWrapper::BPE(BPE::default()));
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(
        ByteLevel::default().add_prefix_space(false),
    )));
    tok.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    tok.train(&mut trainer, texts)
        .map_err(|e| BpeError::Train(e.to_string()))?;
    tok.add_special_tokens(&specials);
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_round_trips_and_keeps_specials() {
        let texts = [
            "Toy Story. 1995. Animation, Children's, Comedy.",
            "GoldenEye. 1995. Action, Adventure, Thriller.",
            "Recommend a movie for someone who watched Toy Story and GoldenEye.",
            "Kategorie: Müller & Söhne – 3½ Zoll",
        ];
        let tok = train_bpe(texts.iter().cycle().take(200), 400).unwrap();
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(s), Some(i as u32), "{s}");
        }
        for t in texts {
            let enc = tok.encode(t, false).unwrap();
            assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), t);
        }
        let enc = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(enc.get_ids()[0], 2);
        assert!(enc.get_ids().contains(&3));
        // Deterministic.
        let again = train_bpe(texts.iter().cycle().take(200), 400).unwrap();
        assert_eq!(
            tok.to_string(false).unwrap(),
            again.to_string(false).unwrap()
        );
        assert!(train_bpe(texts.iter(), 100).is_err());
    }
}
