//! Chat prompt templates and the interactive REPL.

use super::generate::GenerateOptions;
use super::Loaded;
use crate::tokenizer::Tok;
use anyhow::{bail, Result};
use std::io::{BufRead, Write};

pub use crate::template::{default_template_for, render, Template, Turn, ALPACA_PREFIX, ALPACA_SUFFIX, CHATML_END};

/// ChatML where the tokenizer knows `<|im_start|>`, otherwise Alpaca (the Linly default).
pub fn default_template(tok: &Tok) -> Template {
    default_template_for(tok.token_id("<|im_start|>").is_some())
}

/// Ids that end an answer: the model's EOS ids, the tokenizer's end markers, and ChatML's
/// `<|im_end|>` under that template.
pub fn stop_ids(loaded: &Loaded, tok: &Tok, template: Template) -> Vec<u32> {
    let mut v = super::generate::default_stop_ids(loaded);
    if template == Template::ChatMl {
        v.extend(tok.token_id(CHATML_END));
    }
    v.sort();
    v.dedup();
    v
}

/// Tokenizes a rendered prompt. Templates that spell their own markers (`<s>`, `<|im_start|>`)
/// get no extra BOS.
pub fn encode_prompt(loaded: &Loaded, tok: &Tok, template: Template, text: &str) -> Result<Vec<u32>> {
    match template {
        Template::Alpaca => super::generate::text_prompt(loaded, text),
        Template::Llama2 => tok.encode(text, false),
        Template::ChatMl => tok.encode(text, true),
    }
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
    if system.is_some() && template == Template::Alpaca {
        writeln!(out, "(the alpaca template has no system prompt: --system is not used)")?;
    }
    loop {
        write!(out, "\n> ")?;
        out.flush()?;
        let mut raw = Vec::new();
        if input.read_until(b'\n', &mut raw)? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        // A line that is not UTF-8 (a terminal in another encoding) is one bad message, not the
        // end of the session.
        let Ok(line) = String::from_utf8(raw) else {
            writeln!(out, "error: that line is not UTF-8 text; set the terminal to UTF-8 and type it again")?;
            continue;
        };
        let msg = line.trim_end_matches(['\n', '\r']).trim();
        match msg {
            "" => continue,
            "/quit" | "/exit" => return Ok(()),
            "/reset" => {
                history.clear();
                writeln!(out, "(history cleared)")?;
                continue;
            }
            // A message that starts with a slash and one word is a mistyped command, not a
            // question (a path such as `/usr/bin x` has more than one word, and is sent).
            cmd if cmd.starts_with('/') && !cmd.contains(char::is_whitespace) && cmd.len() > 1 && cmd[1..].chars().all(|c| c.is_ascii_alphabetic()) => {
                writeln!(out, "unknown command {cmd}: /reset clears the history, /quit exits")?;
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
        let new = super::generate::stream(loaded, &ids, &opts, out)?;
        writeln!(out)?;
        let answer_ids: Vec<u32> = new.into_iter().filter(|id| !opts.stop_ids.contains(id)).collect();
        let answer = tok.decode(&answer_ids)?;
        history.push(Turn { user: msg.to_string(), assistant: answer.trim().to_string() });
    }
}

