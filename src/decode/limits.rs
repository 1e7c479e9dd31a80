//! The bounds every request is held to, whichever door it comes in by: `sidrec
//! recommend`, the REPL and `sidrec serve` check the same numbers and say the same
//! words when one is crossed.
//!
//! The bounds exist because each one buys decoding time: `k` and the beam width are rows
//! of the KV cache at every step, `mix_recent` a whole decoder pass per item, generated
//! tokens a forward pass each, and a long query or history a long prompt. A value of 0
//! where 0 means nothing (`k`, beams, generated tokens) is refused rather than quietly
//! read as 1, so a typo is not mistaken for an answer.

use super::engine::Request;
use super::DecodeError;

/// Upper bounds of a request; [`Limits::default`] is what every front end uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest `query`, in bytes.
    pub max_query: usize,
    /// Most history entries.
    pub max_history: usize,
    /// Largest `k` (items returned).
    pub max_k: usize,
    /// Widest beam.
    pub max_beams: usize,
    /// Most generated tokens (describe, chat).
    pub max_tokens: usize,
    /// Most recent items asked alone (`mix_recent`; each costs a decoder pass).
    pub max_mix_recent: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_query: 2000,
            max_history: 500,
            max_k: 100,
            // Twice the largest k: the engine's own default width is 2k.
            max_beams: 200,
            max_tokens: 512,
            max_mix_recent: 8,
        }
    }
}

fn invalid(message: String) -> DecodeError {
    DecodeError::Invalid(message)
}

impl Limits {
    /// A query of at most `max_query` bytes.
    pub fn check_query(&self, query: &str) -> Result<(), DecodeError> {
        if query.len() > self.max_query {
            return Err(invalid(format!(
                "query is {} bytes; at most {} are read",
                query.len(),
                self.max_query
            )));
        }
        Ok(())
    }

    /// A history of at most `max_history` entries.
    pub fn check_history(&self, len: usize) -> Result<(), DecodeError> {
        if len > self.max_history {
            return Err(invalid(format!(
                "history has {len} items; at most {} are read",
                self.max_history
            )));
        }
        Ok(())
    }

    /// `k` in `1..=max_k`.
    pub fn check_k(&self, k: usize) -> Result<usize, DecodeError> {
        in_range("k", k, 1, self.max_k)
    }

    /// A beam width in `1..=max_beams`, widened to `k` (a beam narrower than the answer
    /// could not hold it); `None` leaves the engine's default.
    pub fn check_beams(
        &self,
        beams: Option<usize>,
        k: usize,
    ) -> Result<Option<usize>, DecodeError> {
        beams
            .map(|n| in_range("beams", n, 1, self.max_beams).map(|n| n.max(k)))
            .transpose()
    }

    /// Generated tokens in `1..=max_tokens`.
    pub fn check_max_tokens(&self, n: usize) -> Result<usize, DecodeError> {
        in_range("max_tokens", n, 1, self.max_tokens)
    }

    /// `mix_recent` in `0..=max_mix_recent`.
    pub fn check_mix_recent(&self, n: usize) -> Result<usize, DecodeError> {
        in_range("mix_recent", n, 0, self.max_mix_recent)
    }

    /// Every bound a built request carries (query, history, k, beams, mix_recent), in
    /// that order; returns the request with its beam width widened to `k`.
    pub fn check_request(&self, mut req: Request) -> Result<Request, DecodeError> {
        self.check_query(&req.query)?;
        self.check_history(req.history.len())?;
        self.check_k(req.k)?;
        req.beams = self.check_beams(req.beams, req.k)?;
        self.check_mix_recent(req.mix_recent)?;
        Ok(req)
    }
}

fn in_range(what: &str, n: usize, lo: usize, hi: usize) -> Result<usize, DecodeError> {
    if n < lo || n > hi {
        return Err(invalid(format!("{what} must be {lo} to {hi}, got {n}")));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(r: Result<impl std::fmt::Debug, DecodeError>) -> String {
        match r {
            Err(DecodeError::Invalid(m)) => m,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn each_limit_has_its_message() {
        let l = Limits::default();
        assert_eq!(message(l.check_k(0)), "k must be 1 to 100, got 0");
        assert_eq!(
            message(l.check_k(100_000)),
            "k must be 1 to 100, got 100000"
        );
        assert_eq!(
            message(l.check_beams(Some(0), 5)),
            "beams must be 1 to 200, got 0"
        );
        assert_eq!(
            message(l.check_max_tokens(0)),
            "max_tokens must be 1 to 512, got 0"
        );
        assert_eq!(
            message(l.check_mix_recent(9)),
            "mix_recent must be 0 to 8, got 9"
        );
        assert_eq!(
            message(l.check_query(&"x".repeat(2001))),
            "query is 2001 bytes; at most 2000 are read"
        );
        assert_eq!(
            message(l.check_history(501)),
            "history has 501 items; at most 500 are read"
        );
    }

    #[test]
    fn bounds_themselves_pass_and_beams_widen_to_k() {
        let l = Limits::default();
        assert_eq!(l.check_k(1).unwrap(), 1);
        assert_eq!(l.check_k(100).unwrap(), 100);
        assert_eq!(l.check_beams(None, 10).unwrap(), None);
        assert_eq!(l.check_beams(Some(3), 10).unwrap(), Some(10));
        assert_eq!(l.check_beams(Some(200), 10).unwrap(), Some(200));
        assert_eq!(l.check_mix_recent(0).unwrap(), 0);
        assert_eq!(l.check_max_tokens(512).unwrap(), 512);
        l.check_query(&"x".repeat(2000)).unwrap();
        l.check_history(500).unwrap();
        let req = l
            .check_request(Request {
                k: 20,
                beams: Some(4),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(req.beams, Some(20));
        assert!(l
            .check_request(Request {
                k: 0,
                ..Default::default()
            })
            .is_err());
    }
}
