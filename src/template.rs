//! Prompt templates, shared by chat/serve (inference) and by instruction data (training), so a
//! model is trained on exactly the prompt it is later asked with. Pure string functions.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    /// The Alpaca template of the LLama2-chat-13B-Chinese card (Linly).
    Alpaca,
    ChatMl,
    Llama2,
}

impl std::str::FromStr for Template {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "alpaca" => Ok(Template::Alpaca),
            "chatml" => Ok(Template::ChatMl),
            "llama2" => Ok(Template::Llama2),
            _ => bail!("unknown template `{s}`: use alpaca, chatml or llama2"),
        }
    }
}

impl Template {
    /// The spelling used by `--template` and by recipes.
    pub fn as_str(self) -> &'static str {
        match self {
            Template::Alpaca => "alpaca",
            Template::ChatMl => "chatml",
            Template::Llama2 => "llama2",
        }
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Opens a ChatML turn; SmolLM2 uses it as its BOS.
pub const CHATML_START: &str = "<|im_start|>";
/// Closes an assistant turn in ChatML. Training answers end with it (then EOS, unless EOS is
/// this very token, as in SmolLM2) because chat stops on it.
pub const CHATML_END: &str = "<|im_end|>";

/// ChatML when the tokenizer has `<|im_start|>`, otherwise Alpaca (the Linly default).
pub fn default_template_for(has_im_start: bool) -> Template {
    if has_im_start {
        Template::ChatMl
    } else {
        Template::Alpaca
    }
}

pub const ALPACA_PREFIX: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n\n";
pub const ALPACA_SUFFIX: &str = "\n\n### Response:\n\n";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub user: String,
    pub assistant: String,
}

/// The prompt for `msg` after `history`, ending where the model's answer starts.
pub fn render(template: Template, system: Option<&str>, history: &[Turn], msg: &str) -> String {
    match template {
        Template::Alpaca => {
            let instruction = if history.is_empty() {
                msg.to_string()
            } else {
                let mut s = String::new();
                for t in history {
                    s.push_str(&format!("Human:{}\nAssistant:{}\n", t.user, t.assistant));
                }
                s.push_str(&format!("Human:{msg}"));
                s
            };
            format!("{ALPACA_PREFIX}{instruction}{ALPACA_SUFFIX}")
        }
        Template::ChatMl => {
            let mut s = String::new();
            if let Some(sys) = system {
                s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
            }
            for t in history {
                s.push_str(&format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n", t.user, t.assistant));
            }
            s.push_str(&format!("<|im_start|>user\n{msg}<|im_end|>\n<|im_start|>assistant\n"));
            s
        }
        Template::Llama2 => {
            let sys = system.map(|s| format!("<<SYS>>\n{s}\n<</SYS>>\n\n")).unwrap_or_default();
            let mut s = String::new();
            for (i, t) in history.iter().enumerate() {
                let p = if i == 0 { sys.as_str() } else { "" };
                s.push_str(&format!("<s>[INST] {p}{} [/INST] {} </s>", t.user, t.assistant));
            }
            let p = if history.is_empty() { sys.as_str() } else { "" };
            s.push_str(&format!("<s>[INST] {p}{msg} [/INST]"));
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alpaca_single_and_multi_turn() {
        let s = render(Template::Alpaca, None, &[], "你好");
        assert_eq!(s, format!("{ALPACA_PREFIX}你好{ALPACA_SUFFIX}"));
        let h = vec![Turn { user: "a".into(), assistant: "b".into() }];
        let s = render(Template::Alpaca, None, &h, "c");
        assert_eq!(s, format!("{ALPACA_PREFIX}Human:a\nAssistant:b\nHuman:c{ALPACA_SUFFIX}"));
    }

    #[test]
    fn chatml_shape() {
        let s = render(Template::ChatMl, Some("sys"), &[], "hi");
        assert_eq!(s, "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }
}
