//! Streaming text from token ids in time proportional to the new tokens, not to the whole turn:
//! the algorithm of `tokenizers`' `DecodeStream`, over an owned tokenizer handle. Only the tokens
//! since the last complete character boundary are decoded again, with a few before them for
//! context (a tokenizer's decoder may drop or merge a leading space).

use std::sync::Arc;

use troupe_engine::Tokenizer;

/// Turns a stream of ids into text deltas; a delta waits while a UTF-8 character is incomplete.
pub(crate) struct TextStream {
    tokenizer: Arc<Tokenizer>,
    /// The ids decoded last, from the start of the context.
    ids: Vec<u32>,
    /// The text of `ids[..prefix_index]`.
    prefix: String,
    /// How many of `ids` are context already sent.
    prefix_index: usize,
}

impl TextStream {
    /// A stream with no context.
    pub(crate) fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
        }
    }

    /// The text `new` completes: empty while the last character is incomplete.
    pub(crate) fn push(&mut self, new: &[u32]) -> String {
        let mut out = String::new();
        for &id in new {
            match self.step(id) {
                Ok(Some(text)) => out.push_str(&text),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "a token did not decode; its text is skipped"),
            }
        }
        out
    }

    fn step(&mut self, id: u32) -> troupe_engine::Result<Option<String>> {
        if self.prefix.is_empty() && !self.ids.is_empty() {
            let prefix = self.tokenizer.decode(&self.ids)?;
            if !prefix.ends_with('\u{FFFD}') {
                self.prefix = prefix;
                self.prefix_index = self.ids.len();
            }
        }
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        if text.len() <= self.prefix.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let Some(delta) = text.strip_prefix(self.prefix.as_str()).map(str::to_string) else {
            // The decoder rewrote the context: start over from this token.
            self.ids = vec![id];
            self.prefix.clear();
            self.prefix_index = 0;
            return Ok(Some(text));
        };
        let kept = self.ids.len() - self.prefix_index;
        self.ids.drain(..self.prefix_index);
        self.prefix = self.tokenizer.decode(&self.ids)?;
        self.prefix_index = kept;
        Ok(Some(delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deltas_add_up_to_the_whole_text_one_token_at_a_time_or_in_blocks() {
        let tok = Arc::new(
            Tokenizer::from_json(&troupe_engine::tokenizer::byte_level_tokenizer_json()).unwrap(),
        );
        // "héllo, wörld ✓": multi-byte characters split across byte tokens.
        let ids: Vec<u32> = "héllo, wörld ✓".bytes().map(u32::from).collect();
        let whole = tok.decode(&ids).unwrap();
        for block in [1, 2, 3, 7] {
            let mut s = TextStream::new(tok.clone());
            let mut text = String::new();
            for chunk in ids.chunks(block) {
                let delta = s.push(chunk);
                assert!(!delta.contains('\u{FFFD}'), "block {block}: {delta:?}");
                text.push_str(&delta);
            }
            assert_eq!(text, whole, "block {block}");
        }
    }
}
