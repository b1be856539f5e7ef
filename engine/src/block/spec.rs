//! What a block drafter's `config.json` adds to its decoder's: the verifier layers it taps and the
//! size of its block.

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// The key under which a block drafter's settings sit in its `config.json`.
pub const CONFIG_KEY: &str = "block_drafter";

/// A block drafter's settings beside its decoder's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockSpec {
    /// Verifier layers whose outputs are concatenated into the context, shallow to deep.
    pub target_layer_ids: Vec<usize>,
    /// Rows of one block: the anchor, any known tokens after it, then masks. A block drafts at
    /// most `block_size - 1` tokens.
    pub block_size: usize,
    /// Hidden size of the verifier it was trained on (its layer outputs are what it reads).
    pub verifier_hidden_size: usize,
    /// Layers of the verifier it was trained on.
    pub verifier_layers: usize,
}

impl BlockSpec {
    /// Checks the spec against itself and against a verifier of `hidden` width and `layers` layers.
    pub fn check(&self, hidden: usize, layers: usize) -> Result<()> {
        let bad = |why: String| Err(EngineError::InvalidConfig(why));
        if self.target_layer_ids.is_empty() {
            return bad("a block drafter taps at least one verifier layer".into());
        }
        if self.block_size < 2 {
            return bad(format!(
                "a block of {} rows drafts nothing: it needs an anchor and a mask",
                self.block_size
            ));
        }
        if let Some(&l) = self.target_layer_ids.iter().find(|&&l| l >= layers) {
            return bad(format!(
                "the drafter taps layer {l}, the verifier has {layers} layers"
            ));
        }
        if hidden != self.verifier_hidden_size || layers != self.verifier_layers {
            return bad(format!(
                "the drafter was trained on a verifier of hidden size {} with {} layers, \
                 this one has {hidden} and {layers}",
                self.verifier_hidden_size, self.verifier_layers
            ));
        }
        Ok(())
    }

    /// The spec in `config.json`'s text, if it has one (a plain model's config has none).
    pub fn from_config_json(text: &str) -> Result<Option<Self>> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| EngineError::InvalidConfig(format!("config.json: {e}")))?;
        match v.get(CONFIG_KEY) {
            None => Ok(None),
            Some(s) => serde_json::from_value(s.clone())
                .map(Some)
                .map_err(|e| EngineError::InvalidConfig(format!("config.json {CONFIG_KEY}: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_is_checked_against_the_verifier() {
        let s = BlockSpec {
            target_layer_ids: vec![0, 2, 3],
            block_size: 16,
            verifier_hidden_size: 192,
            verifier_layers: 4,
        };
        assert!(s.check(192, 4).is_ok());
        assert!(
            s.check(192, 3).is_err(),
            "layer 3 is past a 3-layer verifier"
        );
        assert!(s.check(256, 4).is_err(), "another verifier's width");
        let none = BlockSpec {
            target_layer_ids: vec![],
            ..s.clone()
        };
        assert!(none.check(192, 4).is_err());
        let text = serde_json::json!({ "hidden_size": 192, CONFIG_KEY: s }).to_string();
        assert_eq!(BlockSpec::from_config_json(&text).unwrap(), Some(s));
        assert_eq!(BlockSpec::from_config_json("{}").unwrap(), None);
        assert!(BlockSpec::from_config_json("{").is_err());
    }
}
