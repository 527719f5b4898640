//! Chat prompt templates and the interactive REPL.

use super::generate::{generate, GenerateOptions};
use super::Loaded;
use crate::tokenizer::{StreamDecoder, Tok};
use anyhow::{bail, Result};
use std::io::{BufRead, Write};

pub use crate::template::{default_template_for, render, Template, Turn, ALPACA_PREFIX, ALPACA_SUFFIX};

/// ChatML where the tokenizer knows `<|im_start|>`, otherwise Alpaca (the Linly default).
pub fn default_template(tok: &Tok) -> Template {
    default_template_for(tok.token_id("<|im_start|>").is_some())
}

/// Ids that end an answer: the model's EOS ids plus the template's end marker.
pub fn stop_ids(loaded: &Loaded, tok: &Tok, template: Template) -> Vec<u32> {
    let mut v = loaded.model.config.eos_token_ids.clone();
    for p in ["</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>"] {
        if let Some(id) = tok.token_id(p) {
            if p != "<|im_end|>" || template == Template::ChatMl {
                v.push(id);
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Tokenizes a rendered prompt. Templates that spell `<s>` themselves get no extra BOS.
pub fn encode_prompt(loaded: &Loaded, tok: &Tok, template: Template, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, template != Template::Llama2)?;
    if template != Template::Llama2 && template != Template::ChatMl {
        if let Some(bos) = loaded.model.config.bos_token_id {
            if ids.first() != Some(&bos) && tok.adds_bos(bos) {
                ids.insert(0, bos);
            }
        }
    }
    Ok(ids)
}

/// Drops the oldest turns until the prompt plus `reserve` new tokens fits the context.
pub fn fit_history(
    loaded: &Loaded,
    tok: &Tok,
    template: Template,
    system: Option<&str>,
    history: &mut Vec<Turn>,
    msg: &str,
    reserve: usize,
) -> Result<Vec<u32>> {
    let ctx = loaded.model.config.max_position_embeddings;
    loop {
        let ids = encode_prompt(loaded, tok, template, &render(template, system, history, msg))?;
        if ids.len() + reserve <= ctx {
            return Ok(ids);
        }
        if history.is_empty() {
            bail!("the message is {} tokens; with {reserve} tokens reserved for the answer it does not fit the context of {ctx}", ids.len());
        }
        history.remove(0);
    }
}

/// The REPL: reads lines, streams answers, keeps history. `/reset` clears it, `/quit` or
/// end-of-input (Ctrl-D) leaves.
pub fn repl(
    loaded: &Loaded,
    template: Template,
    system: Option<&str>,
    opts: &GenerateOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<()> {
    let tok = loaded.tok.as_ref().ok_or_else(|| anyhow::anyhow!("chat needs a tokenizer.json in the model folder (or --tokenizer)"))?;
    let mut opts = opts.clone();
    opts.stop_ids = stop_ids(loaded, tok, template);
    let mut history: Vec<Turn> = Vec::new();
    writeln!(out, "linly-lora chat ({template:?} template). /reset clears the history, /quit or Ctrl-D exits.")?;
    loop {
        write!(out, "\n> ")?;
        out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let msg = line.trim_end_matches(['\n', '\r']).trim();
        match msg {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                history.clear();
                writeln!(out, "(history cleared)")?;
                continue;
            }
            _ => {}
        }
        let ids = match fit_history(loaded, tok, template, system, &mut history, msg, opts.max_new_tokens.min(256)) {
            Ok(ids) => ids,
            Err(e) => {
                writeln!(out, "error: {e:#}")?;
                continue;
            }
        };
        let mut dec = StreamDecoder::new();
        let mut answer_ids = Vec::new();
        let stops = opts.stop_ids.clone();
        generate(&loaded.model, &ids, &opts, &loaded.device, |id| {
            if !stops.contains(&id) {
                answer_ids.push(id);
                if let Some(s) = dec.push(tok, id)? {
                    write!(out, "{s}")?;
                    out.flush()?;
                }
            }
            Ok(true)
        })?;
        writeln!(out)?;
        let answer = tok.decode(&answer_ids)?;
        history.push(Turn { user: msg.to_string(), assistant: answer.trim().to_string() });
    }
}

