//! Semantic-ID tokens: naming, the SID vocabulary of a catalog, parse and format.
//!
//! A SID is a type token followed by one token per level and, only for items whose level
//! codes collide, a dedup token: `<movie><a_17><b_203><c_5>` or `<movie><a_1><b_2><c_3><d_1>`.
//! Each level has its own letter, so code 17 of level a is a different token from code
//! 17 of level b; the dedup level takes the letter after the last level.
//!
//! [`SidVocab`] numbers these tokens densely, in a fixed order (types, then each level's
//! codes, then dedup codes). A language model appends exactly this list to its vocabulary
//! in one call, so a SID token id is the model's id minus a constant offset, and the trie
//! built here over SID ids is valid for the model too.

use serde::{Deserialize, Serialize};

/// Errors of SID naming and parsing.
#[derive(Debug, thiserror::Error)]
pub enum SidError {
    #[error("{levels} levels: at most 25 are supported (letters a..y, and the next for dedup)")]
    TooManyLevels { levels: usize },
    #[error(
        "{types} types, {levels:?} codes per level and {dedup} dedup codes: more than \
         {MAX_TOKENS} SID tokens"
    )]
    TooManyTokens {
        types: usize,
        levels: Vec<usize>,
        dedup: usize,
    },
    #[error("unknown entity type {0:?}")]
    UnknownType(String),
    #[error("item has {got} codes, the vocabulary has {want} levels")]
    CodeCount { got: usize, want: usize },
    #[error("code {code} at level {level} is out of range (the level has {size} codes)")]
    CodeRange {
        level: usize,
        code: u32,
        size: usize,
    },
    #[error("cannot parse SID {sid:?}: {reason}")]
    Parse { sid: String, reason: String },
    #[error("token id {0} is not a SID token")]
    UnknownId(u32),
}

/// Token-id type shared with the trie.
pub type TokenId = u32;

/// The most tokens a [`SidVocab`] may have. Every SID token becomes a row of the
/// model's embedding table and an entry of its tokenizer, so real vocabularies are far
/// smaller (codes per level are at most the number of items); a bigger count read from
/// a file is a corrupt file, and refusing it keeps every id a valid [`TokenId`], every
/// offset free of overflow and [`SidVocab::tokens`] a reasonable allocation.
pub const MAX_TOKENS: usize = 1 << 24;

/// Letter naming level `l` (0-based): a, b, c, …
pub fn level_letter(level: usize) -> char {
    (b'a' + level as u8) as char
}

/// `<a_17>`.
pub fn level_token(level: usize, code: u32) -> String {
    format!("<{}_{}>", level_letter(level), code)
}

/// `<movie>`.
pub fn type_token(item_type: &str) -> String {
    format!("<{item_type}>")
}

/// The SID tokens of one catalog.
///
/// Deserializing goes through [`SidVocab::new`], so a vocabulary read from a file (the
/// codebooks metadata) meets the same limits as one built in memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawSidVocab")]
pub struct SidVocab {
    /// Entity types, sorted.
    pub types: Vec<String>,
    /// Codes per level.
    pub levels: Vec<usize>,
    /// Dedup codes (0 when every tuple is unique).
    pub dedup: usize,
}

/// The serialized form of [`SidVocab`], before its checks.
#[derive(Deserialize)]
struct RawSidVocab {
    types: Vec<String>,
    levels: Vec<usize>,
    dedup: usize,
}

impl TryFrom<RawSidVocab> for SidVocab {
    type Error = SidError;

    fn try_from(raw: RawSidVocab) -> Result<Self, SidError> {
        SidVocab::new(raw.types, raw.levels, raw.dedup)
    }
}

/// One SID, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sid {
    pub item_type: String,
    pub codes: Vec<u32>,
    pub dedup: Option<u32>,
}

impl SidVocab {
    /// A vocabulary of `types` (sorted and deduplicated here), `levels[l]` codes at level
    /// `l` and `dedup` dedup codes. At most 25 levels (one letter each, and the next for
    /// dedup) and [`MAX_TOKENS`] tokens in all.
    pub fn new(mut types: Vec<String>, levels: Vec<usize>, dedup: usize) -> Result<Self, SidError> {
        if levels.len() > 25 {
            return Err(SidError::TooManyLevels {
                levels: levels.len(),
            });
        }
        types.sort();
        types.dedup();
        let total = levels
            .iter()
            .try_fold(types.len(), |sum, &k| sum.checked_add(k))
            .and_then(|sum| sum.checked_add(dedup))
            .filter(|&sum| sum <= MAX_TOKENS);
        if total.is_none() {
            return Err(SidError::TooManyTokens {
                types: types.len(),
                levels,
                dedup,
            });
        }
        Ok(SidVocab {
            types,
            levels,
            dedup,
        })
    }

    /// Number of SID tokens.
    pub fn len(&self) -> usize {
        self.types.len() + self.levels.iter().sum::<usize>() + self.dedup
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn level_offset(&self, level: usize) -> usize {
        self.types.len() + self.levels[..level].iter().sum::<usize>()
    }

    fn dedup_offset(&self) -> usize {
        self.types.len() + self.levels.iter().sum::<usize>()
    }

    /// Letter of the dedup level.
    pub fn dedup_letter(&self) -> char {
        level_letter(self.levels.len())
    }

    pub fn type_id(&self, item_type: &str) -> Option<TokenId> {
        self.types
            .binary_search_by(|t| t.as_str().cmp(item_type))
            .ok()
            .map(|i| i as TokenId)
    }

    /// Ids of the type tokens, in type order: the root's children in the trie.
    pub fn type_ids(&self) -> std::ops::Range<TokenId> {
        0..self.types.len() as TokenId
    }

    /// All SID tokens in id order: what a model adds to its vocabulary.
    pub fn tokens(&self) -> Vec<String> {
        (0..self.len() as TokenId)
            .map(|id| self.token(id).expect("id in range"))
            .collect()
    }

    /// The token string of a SID token id.
    pub fn token(&self, id: TokenId) -> Result<String, SidError> {
        let mut i = id as usize;
        if i < self.types.len() {
            return Ok(type_token(&self.types[i]));
        }
        i -= self.types.len();
        for (l, &k) in self.levels.iter().enumerate() {
            if i < k {
                return Ok(level_token(l, i as u32));
            }
            i -= k;
        }
        if i < self.dedup {
            return Ok(format!("<{}_{}>", self.dedup_letter(), i));
        }
        Err(SidError::UnknownId(id))
    }

    /// Token ids of a SID.
    pub fn encode(
        &self,
        item_type: &str,
        codes: &[u32],
        dedup: Option<u32>,
    ) -> Result<Vec<TokenId>, SidError> {
        let t = self
            .type_id(item_type)
            .ok_or_else(|| SidError::UnknownType(item_type.to_string()))?;
        if codes.len() != self.levels.len() {
            return Err(SidError::CodeCount {
                got: codes.len(),
                want: self.levels.len(),
            });
        }
        let mut ids = Vec::with_capacity(codes.len() + 2);
        ids.push(t);
        for (l, &c) in codes.iter().enumerate() {
            if c as usize >= self.levels[l] {
                return Err(SidError::CodeRange {
                    level: l,
                    code: c,
                    size: self.levels[l],
                });
            }
            ids.push((self.level_offset(l) + c as usize) as TokenId);
        }
        if let Some(c) = dedup {
            if c as usize >= self.dedup {
                return Err(SidError::CodeRange {
                    level: self.levels.len(),
                    code: c,
                    size: self.dedup,
                });
            }
            ids.push((self.dedup_offset() + c as usize) as TokenId);
        }
        Ok(ids)
    }

    /// The token string of a SID: `<movie><a_17><b_203><c_5>`.
    pub fn format(&self, ids: &[TokenId]) -> Result<String, SidError> {
        ids.iter().map(|&id| self.token(id)).collect()
    }

    /// Parses a SID token string into token ids, checking the order type, levels, dedup.
    pub fn parse(&self, sid: &str) -> Result<Vec<TokenId>, SidError> {
        let err = |reason: String| SidError::Parse {
            sid: sid.to_string(),
            reason,
        };
        let mut tokens = Vec::new();
        let mut rest = sid.trim();
        while !rest.is_empty() {
            if !rest.starts_with('<') {
                return Err(err(format!("expected '<' at {rest:?}")));
            }
            let end = rest
                .find('>')
                .ok_or_else(|| err("unclosed '<'".to_string()))?;
            tokens.push(&rest[1..end]);
            rest = &rest[end + 1..];
        }
        let (first, codes) = tokens
            .split_first()
            .ok_or_else(|| err("empty".to_string()))?;
        let t = self
            .type_id(first)
            .ok_or_else(|| err(format!("unknown type token <{first}>")))?;
        let nl = self.levels.len();
        if codes.len() != nl && codes.len() != nl + 1 {
            return Err(err(format!(
                "{} code tokens, expected {} (or {} with dedup)",
                codes.len(),
                nl,
                nl + 1
            )));
        }
        let mut ids = vec![t];
        for (l, tok) in codes.iter().enumerate() {
            let letter = level_letter(l);
            let code: u32 = tok
                .strip_prefix(letter)
                .and_then(|r| r.strip_prefix('_'))
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| err(format!("token <{tok}> is not a level-{letter} code")))?;
            let (offset, size) = if l < nl {
                (self.level_offset(l), self.levels[l])
            } else {
                (self.dedup_offset(), self.dedup)
            };
            if code as usize >= size {
                return Err(err(format!("code <{tok}> out of range ({size} codes)")));
            }
            ids.push((offset + code as usize) as TokenId);
        }
        Ok(ids)
    }

    /// Decodes token ids into type, codes and dedup code.
    pub fn decode(&self, ids: &[TokenId]) -> Result<Sid, SidError> {
        let s = self.format(ids)?;
        let ids = self.parse(&s)?;
        let item_type = self.types[ids[0] as usize].clone();
        let nl = self.levels.len();
        let codes = (0..nl)
            .map(|l| ids[l + 1] - self.level_offset(l) as u32)
            .collect();
        let dedup = ids.get(nl + 1).map(|&d| d - self.dedup_offset() as u32);
        Ok(Sid {
            item_type,
            codes,
            dedup,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> SidVocab {
        SidVocab::new(vec!["podcast".into(), "movie".into()], vec![4, 3, 2], 2).unwrap()
    }

    #[test]
    fn ids_are_dense_and_ordered() {
        let v = vocab();
        assert_eq!(v.len(), 2 + 4 + 3 + 2 + 2);
        let toks = v.tokens();
        assert_eq!(
            toks,
            [
                "<movie>",
                "<podcast>",
                "<a_0>",
                "<a_1>",
                "<a_2>",
                "<a_3>",
                "<b_0>",
                "<b_1>",
                "<b_2>",
                "<c_0>",
                "<c_1>",
                "<d_0>",
                "<d_1>"
            ]
        );
    }

    #[test]
    fn encode_format_parse_round_trip() {
        let v = vocab();
        let ids = v.encode("podcast", &[3, 1, 0], Some(1)).unwrap();
        let s = v.format(&ids).unwrap();
        assert_eq!(s, "<podcast><a_3><b_1><c_0><d_1>");
        assert_eq!(v.parse(&s).unwrap(), ids);
        let sid = v.decode(&ids).unwrap();
        assert_eq!(sid.codes, vec![3, 1, 0]);
        assert_eq!(sid.dedup, Some(1));
        let ids = v.encode("movie", &[0, 0, 1], None).unwrap();
        assert_eq!(v.format(&ids).unwrap(), "<movie><a_0><b_0><c_1>");
    }

    #[test]
    fn size_limits() {
        assert!(SidVocab::new(vec!["a".into()], vec![1; 25], 1).is_ok());
        assert!(matches!(
            SidVocab::new(vec!["a".into()], vec![1; 26], 0),
            Err(SidError::TooManyLevels { levels: 26 })
        ));
        assert!(SidVocab::new(vec!["a".into()], vec![MAX_TOKENS - 1], 0).is_ok());
        for (levels, dedup) in [
            (vec![MAX_TOKENS], 0),
            (vec![usize::MAX, 1], 0),
            (vec![1], usize::MAX),
        ] {
            assert!(matches!(
                SidVocab::new(vec!["a".into()], levels, dedup),
                Err(SidError::TooManyTokens { .. })
            ));
        }
    }

    #[test]
    fn bad_sids_are_errors() {
        let v = vocab();
        for bad in [
            "",
            "<movie>",
            "<book><a_0><b_0><c_0>",
            "<movie><b_0><a_0><c_0>",
            "<movie><a_4><b_0><c_0>",
            "<movie><a_0><b_0><c_0><d_2>",
            "<movie><a_0><b_0",
            "movie<a_0><b_0><c_0>",
        ] {
            assert!(v.parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(v.encode("movie", &[0, 0], None).is_err());
        assert!(v.encode("movie", &[0, 3, 0], None).is_err());
        assert!(v.encode("book", &[0, 0, 0], None).is_err());
    }
}
