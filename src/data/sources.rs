//! The `[[data]]` blocks of a recipe and the readers that turn their files into [`Example`]s
//! (text, before tokenization). Every reader is strict: a malformed record is an error that
//! names `file:line`, never a skipped line, so a typo in a data file cannot silently shrink the
//! training set.

use crate::template::{render, Template, Turn, CHATML_END};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Instruction for the zh→en view of a `parallel` pair. Written in Chinese because an
/// instruction in the language of the sentence is what a Chinese user types; it matches the
/// wording of the translation records in the HSK/Chinese-LLaMA-Alpaca style data
/// (`把下面的句子翻译成英文。`) closely without copying it, so mixing both sources does not
/// duplicate identical prompts.
pub const ZH_TO_EN_INSTRUCTION: &str = "将下面的句子翻译成英文。";
/// Instruction for the en→zh view of a `parallel` pair (English, for the same reason).
pub const EN_TO_ZH_INSTRUCTION: &str = "Translate the following sentence into Chinese.";

/// What a `[[data]]` block's file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SourceKind {
    /// `.txt` (documents separated by blank lines), or `.jsonl`/`.json` records with `"text"`.
    /// Loss on every token.
    Text,
    /// TSV `zh<TAB>en`; every pair yields zh→en and en→zh translation examples and the
    /// concatenated text `"{zh}\n{en}"`.
    Parallel,
    /// Alpaca `{instruction, input, output}` records (JSON array or JSONL), optionally multi-turn
    /// through `history` or `conversations`. Loss on the response only.
    Alpaca,
    /// Pre-tokenized JSONL `{"input_ids": [...], "labels": [...]}` (labels optional).
    Tokenized,
}

impl SourceKind {
    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Text => "text",
            SourceKind::Parallel => "parallel",
            SourceKind::Alpaca => "alpaca",
            SourceKind::Tokenized => "tokenized",
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SourceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "text" => SourceKind::Text,
            "parallel" => SourceKind::Parallel,
            "alpaca" => SourceKind::Alpaca,
            "tokenized" => SourceKind::Tokenized,
            _ => bail!("unknown data kind `{s}`: use `text`, `parallel`, `alpaca` or `tokenized`"),
        })
    }
}

impl TryFrom<String> for SourceKind {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<SourceKind> for String {
    fn from(k: SourceKind) -> String {
        k.as_str().to_string()
    }
}

/// A source's sampling weight: fixed, or `[start, end]` interpolated linearly over training
/// progress (`step / total_steps`), which is how a curriculum shifts from, say, mostly English
/// to mostly Chinese.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Weight {
    /// `weight = 0.5`
    Fixed(f64),
    /// `weight = [start, end]`
    Ramp([f64; 2]),
}

// Hand-written so that `weight = [1, 2, 3]` or `weight = "high"` says what a weight is, instead
// of serde's "did not match any variant of untagged enum".
impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{Error, IgnoredAny, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Weight;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a weight: a number ≥ 0, or [start, end] for a curriculum")
            }
            fn visit_f64<E: Error>(self, v: f64) -> std::result::Result<Weight, E> {
                Ok(Weight::Fixed(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> std::result::Result<Weight, E> {
                Ok(Weight::Fixed(v as f64))
            }
            fn visit_u64<E: Error>(self, v: u64) -> std::result::Result<Weight, E> {
                Ok(Weight::Fixed(v as f64))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Weight, A::Error> {
                let start: f64 = a.next_element()?.ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let end: f64 = a.next_element()?.ok_or_else(|| A::Error::invalid_length(1, &self))?;
                if a.next_element::<IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(3, &self));
                }
                Ok(Weight::Ramp([start, end]))
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::Fixed(1.0)
    }
}

impl Weight {
    /// The weight at `progress` in `[0, 1]` (clamped).
    pub fn at(&self, progress: f64) -> f64 {
        let p = if progress.is_nan() { 0.0 } else { progress.clamp(0.0, 1.0) };
        match *self {
            Weight::Fixed(w) => w,
            Weight::Ramp([a, b]) => a + (b - a) * p,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        let vals: &[f64] = match self {
            Weight::Fixed(w) => std::slice::from_ref(w),
            Weight::Ramp(r) => r,
        };
        for &w in vals {
            if !w.is_finite() || w < 0.0 {
                bail!("weight {w} is invalid: use a number ≥ 0 or `[start, end]` with both ≥ 0");
            }
        }
        Ok(())
    }
}

/// One `[[data]]` block of a recipe. Deserialize it straight from the recipe (unknown keys are
/// rejected so a misspelt `weigth` is an error, not a silent default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// `text`, `parallel`, `alpaca` or `tokenized`.
    pub kind: SourceKind,
    /// Relative paths are resolved against the directory given to
    /// [`load_sources`](super::load_sources) (the recipe's folder).
    pub path: PathBuf,
    /// Sampling weight (default 1).
    #[serde(default)]
    pub weight: Weight,
    /// A free label (`zh`, `en`, `zh-en`) carried into reports.
    #[serde(default)]
    pub lang: Option<String>,
    /// Name used in reports; defaults to the file name.
    #[serde(default)]
    pub name: Option<String>,
    /// Use only the first N records (documents, pairs, alpaca records, lines) of the file; the
    /// whole file is still validated.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Prompt template for `alpaca` and `parallel` blocks: `alpaca` (default, Linly's),
    /// `chatml` or `llama2`. Train with the template the model will be asked with: a chat
    /// model such as SmolLM2-Instruct already follows its own (ChatML) and nothing else.
    #[serde(default)]
    pub template: Option<Template>,
    /// Weight of the self-distillation term on this source's rows: KL(base ‖ model) on every
    /// position whose target is an old-vocabulary token, the base being the same weights with
    /// the LoRA branches off. Against forgetting, on text the base already reads (English
    /// replay); leave it 0 on the new language, where the base cannot know the new pieces.
    #[serde(default)]
    pub self_distill: f64,
    /// With `self_distill` on a source of the new language: compare only how the model shares
    /// the old tokens' mass among them (its softmax over the old rows renormalised), so that the
    /// term holds the old-vocabulary predictions where LoRA would move them without taxing the
    /// mass the model learns to give new pieces. Off (the default) counts that mass against the
    /// model, which is right on text the base reads (English replay).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub self_distill_renormalize: bool,
    /// Weight of cross-tokenizer distillation on this source's rows (needs `[vocab]`): KL
    /// between the base model's probability of every token of the extended vocabulary, read
    /// from its old sub-tokens, and the model's, at every loss position. It teaches the new
    /// pieces from what the base knows instead of from one-hot labels alone, at the cost of a
    /// base forward pass over the row's old tokenization (about 2.3× its length for Chinese).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chain_distill: f64,
    /// Weight of hidden-state distillation on this source's rows (needs `chain_distill`, whose
    /// teacher pass it reads): the (bounded) relative squared distance between the model's residual
    /// stream after `[train] hidden_distill_layer` layers and the base's after reading the same
    /// piece as sub-tokens, at every loss position. It teaches the lower layers to read a new
    /// piece as the base reads its sub-tokens (Token Distillation's objective, during
    /// training); it costs no extra pass.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hidden_distill: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl SourceSpec {
    /// A block with weight 1 and no labels.
    pub fn new(kind: SourceKind, path: impl Into<PathBuf>) -> Self {
        SourceSpec { kind, path: path.into(), weight: Weight::default(), lang: None, name: None, limit: None, template: None, self_distill: 0.0, self_distill_renormalize: false, chain_distill: 0.0, hidden_distill: 0.0 }
    }

    /// Sets the weight.
    pub fn with_weight(mut self, w: Weight) -> Self {
        self.weight = w;
        self
    }

    /// The prompt template of an instruction block (`alpaca` unless the block names one).
    pub fn template(&self) -> Template {
        self.template.unwrap_or(Template::Alpaca)
    }

    /// Checks what can be checked without the file: the weight, and that `template` sits on a
    /// block whose examples have prompts.
    pub fn check(&self) -> Result<()> {
        self.weight.check()?;
        if let Some(t) = self.template {
            if !matches!(self.kind, SourceKind::Alpaca | SourceKind::Parallel) {
                bail!("`template = \"{t}\"` applies only to `alpaca` and `parallel` blocks (a `{}` block has no prompts); remove it", self.kind);
            }
        }
        Ok(())
    }

    /// `name`, else the file name, plus the `lang` label when there is one.
    pub fn display_name(&self) -> String {
        let base = self.name.clone().unwrap_or_else(|| {
            self.path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| self.path.display().to_string())
        });
        match &self.lang {
            Some(l) if self.name.is_none() => format!("{base} [{l}]"),
            _ => base,
        }
    }
}

/// One training example before tokenization.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// Plain text: `[bos] + tokens + [eos]`, loss on all of it.
    Text(String),
    /// A rendered prompt and its answer: `[bos] + tokens(prompt + response) + [eos]`, loss on
    /// the response and the EOS only. A prompt that spells BOS itself (`<s>[INST]`, or
    /// SmolLM2's `<|im_start|>`, which is its BOS) gets no second one, and an answer that ends
    /// in EOS (`<|im_end|>` there) no second EOS: chat builds its prompts the same way.
    Prompted {
        /// The rendered template, ending where the answer starts.
        prompt: String,
        /// The answer (EOS is added as an id, not as text).
        response: String,
    },
    /// Ids as given (no BOS/EOS added); `labels` HF-aligned, `-100` = no loss; `None` = all.
    Ids {
        /// Token ids.
        ids: Vec<u32>,
        /// Same length as `ids`.
        labels: Option<Vec<i64>>,
    },
}

/// Reads a source file into examples, each with the 1-based line it starts on (for errors
/// raised later, e.g. an id outside the vocabulary).
pub fn read_examples(kind: SourceKind, template: Template, path: &Path) -> Result<Vec<(usize, Example)>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let upto = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..upto].iter().filter(|&&b| b == b'\n').count();
            bail!("{}:{line}: not valid UTF-8; data files must be UTF-8 text", path.display());
        }
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let file = path.display().to_string();
    let out = match kind {
        SourceKind::Text => read_text(&file, path, text, 0)?,
        SourceKind::Parallel => read_parallel(&file, text, template, 0)?,
        SourceKind::Alpaca => read_alpaca(&file, text, template, 0)?,
        SourceKind::Tokenized => read_tokenized(&file, text, 0)?,
    };
    if out.is_empty() {
        bail!("{file}: no examples found; the file is empty or has only blank lines: fill it, or leave it out (in a recipe, its [[data]] block)");
    }
    Ok(out)
}

/// Whether the first non-blank byte opens a JSON array (a file read whole; JSONL streams).
fn starts_json_array(b: &[u8]) -> bool {
    b.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'[')
}

/// Where a piece of a file that does not end at EOF may be cut so every record stays whole:
/// after the last blank line for blank-line-separated text (a document boundary), after the
/// last newline for the line-based kinds. `None`: no boundary yet, read more.
pub(crate) fn cut_point(blocks: bool, b: &[u8]) -> Option<usize> {
    if !blocks {
        return b.iter().rposition(|&c| c == b'\n').map(|p| p + 1);
    }
    // A line of ASCII whitespace is blank for `read_text` too (it trims Unicode whitespace, so
    // it may see more boundaries; cutting at fewer of them is still exact).
    let mut end = b.iter().rposition(|&c| c == b'\n')?;
    loop {
        let start = b[..end].iter().rposition(|&c| c == b'\n').map(|p| p + 1).unwrap_or(0);
        if b[start..end].iter().all(u8::is_ascii_whitespace) {
            return Some(end + 1);
        }
        if start == 0 {
            return None;
        }
        end = start - 1;
    }
}

/// Reads a source file in pieces of about `chunk` bytes that end on record boundaries and hands
/// each piece's examples (lines as [`read_examples`] gives them) to `sink`, with the bytes it
/// covered, so a file of any size is read in bounded memory. The records are exactly those of
/// [`read_examples`], with the same errors; a JSON array (not JSONL) cannot be cut and is read
/// whole, and a blank-line-separated text document must fit in memory.
pub(crate) fn stream_examples(
    kind: SourceKind,
    template: Template,
    path: &Path,
    chunk: usize,
    mut sink: impl FnMut(Vec<(usize, Example)>, u64) -> Result<()>,
) -> Result<()> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read data file {}", path.display()))?;
    let file = path.display().to_string();
    let blocks = kind == SourceKind::Text && !is_json_file(path);
    let json = matches!(kind, SourceKind::Alpaca | SourceKind::Tokenized) || (kind == SourceKind::Text && !blocks);
    let (mut buf, mut eof, mut base, mut first) = (Vec::<u8>::new(), false, 0usize, true);
    let mut target = chunk.max(1);
    loop {
        while !eof && buf.len() < target {
            let old = buf.len();
            buf.resize(target, 0);
            let n = f.read(&mut buf[old..]).with_context(|| format!("cannot read data file {}", path.display()))?;
            buf.truncate(old + n);
            eof = n == 0;
        }
        let mut skipped = 0;
        if first {
            first = false;
            if buf.starts_with("\u{feff}".as_bytes()) {
                buf.drain(..3);
                skipped = 3;
            }
            if json && starts_json_array(&buf) {
                drop(buf);
                let all = read_examples(kind, template, path)?;
                let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                return sink(all, len);
            }
        }
        if buf.is_empty() && eof {
            return Ok(());
        }
        let cut = if eof { Some(buf.len()) } else { cut_point(blocks, &buf) };
        let Some(cut) = cut else {
            target = buf.len() + chunk.max(1);
            continue;
        };
        let text = std::str::from_utf8(&buf[..cut]).map_err(|e| {
            let line = base + 1 + buf[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
            anyhow::anyhow!("{file}:{line}: not valid UTF-8; data files must be UTF-8 text")
        })?;
        let examples = match kind {
            SourceKind::Text => read_text(&file, path, text, base)?,
            SourceKind::Parallel => read_parallel(&file, text, template, base)?,
            SourceKind::Alpaca => read_alpaca(&file, text, template, base)?,
            SourceKind::Tokenized => read_tokenized(&file, text, base)?,
        };
        base += buf[..cut].iter().filter(|&&b| b == b'\n').count();
        sink(examples, (cut + skipped) as u64)?;
        buf.drain(..cut);
        target = chunk.max(1);
    }
}

fn is_json_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("json" | "jsonl"))
}

/// `base`: lines of the file before `text` (when it is one piece of a streamed file).
fn read_text(file: &str, path: &Path, text: &str, base: usize) -> Result<Vec<(usize, Example)>> {
    if is_json_file(path) {
        #[derive(Deserialize)]
        struct Rec {
            text: String,
        }
        let mut out = Vec::new();
        for (line, raw) in json_records(file, text, base)? {
            let r: Rec = parse_record(file, line, raw, "a text record needs a string field \"text\"")?;
            if r.text.trim().is_empty() {
                bail!("{file}:{line}: empty \"text\"; remove the record");
            }
            out.push((line, Example::Text(r.text)));
        }
        return Ok(out);
    }
    // One document per blank-line-separated block: lines inside a block keep their newlines
    // (and indentation, for code), so line-per-sentence files become paragraph documents.
    let mut out = Vec::new();
    let mut cur: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if let Some(doc) = cur.take() {
                out.push((doc.0, Example::Text(doc.1)));
            }
        } else {
            match &mut cur {
                Some((_, s)) => {
                    s.push('\n');
                    s.push_str(line);
                }
                None => cur = Some((base + i + 1, line.to_string())),
            }
        }
    }
    if let Some(doc) = cur {
        out.push((doc.0, Example::Text(doc.1)));
    }
    Ok(out)
}

/// The prompt for an instruction with optional input, as `alpaca` and `parallel` blocks render
/// it: the same [`render`] that chat uses, so training and inference see the same text.
pub fn instruction_prompt(template: Template, instruction: &str, input: &str, history: &[Turn]) -> String {
    let msg = if input.trim().is_empty() { instruction.to_string() } else { format!("{instruction}\n\n{input}") };
    render(template, None, history, &msg)
}

/// The answer as it is trained: ChatML closes the turn with `<|im_end|>`, which chat stops on.
/// Alpaca and Llama-2 answers end with EOS, which the encoder adds as an id.
pub fn instruction_answer(template: Template, output: &str) -> String {
    match template {
        Template::ChatMl => format!("{output}{CHATML_END}"),
        Template::Alpaca | Template::Llama2 => output.to_string(),
    }
}

fn read_parallel(file: &str, text: &str, template: Template, base: usize) -> Result<Vec<(usize, Example)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = base + i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 2 {
            bail!(
                "{file}:{n}: expected `zh<TAB>en` (2 tab-separated fields), found {}; fix or remove the line",
                fields.len()
            );
        }
        let (zh, en) = (fields[0].trim(), fields[1].trim());
        if zh.is_empty() || en.is_empty() {
            bail!("{file}:{n}: one side of the pair is empty; fix or remove the line");
        }
        out.push((n, Example::Prompted { prompt: instruction_prompt(template, ZH_TO_EN_INSTRUCTION, zh, &[]), response: instruction_answer(template, en) }));
        out.push((n, Example::Prompted { prompt: instruction_prompt(template, EN_TO_ZH_INSTRUCTION, en, &[]), response: instruction_answer(template, zh) }));
        out.push((n, Example::Text(format!("{zh}\n{en}"))));
    }
    Ok(out)
}

#[derive(Deserialize)]
struct AlpacaRec {
    instruction: Option<String>,
    input: Option<String>,
    output: Option<String>,
    history: Option<Vec<(String, String)>>,
    conversations: Option<Vec<ConvTurn>>,
}

#[derive(Deserialize)]
struct ConvTurn {
    #[serde(alias = "role")]
    from: String,
    #[serde(alias = "content")]
    value: String,
}

fn read_alpaca(file: &str, text: &str, template: Template, base: usize) -> Result<Vec<(usize, Example)>> {
    let mut out = Vec::new();
    let hint = "an alpaca record is {\"instruction\", \"input\", \"output\"} (optionally \"history\": [[q, a], ...]) or {\"conversations\": [{\"from\": \"human\"|\"gpt\", \"value\"}, ...]}";
    for (line, raw) in json_records(file, text, base)? {
        let r: AlpacaRec = parse_record(file, line, raw, hint)?;
        let (prompt, response) = if let Some(conv) = r.conversations {
            if r.instruction.is_some() || r.output.is_some() || r.history.is_some() {
                bail!("{file}:{line}: record has both \"conversations\" and instruction/output/history; use one form");
            }
            conversation(file, line, &conv, template)?
        } else {
            let instruction = r.instruction.with_context(|| format!("{file}:{line}: missing \"instruction\"; {hint}"))?;
            let output = r.output.with_context(|| format!("{file}:{line}: missing \"output\"; {hint}"))?;
            let input = r.input.unwrap_or_default();
            if instruction.trim().is_empty() && input.trim().is_empty() {
                bail!("{file}:{line}: empty \"instruction\" and \"input\"; remove the record");
            }
            let history: Vec<Turn> = r.history.unwrap_or_default().into_iter().map(|(user, assistant)| Turn { user, assistant }).collect();
            (instruction_prompt(template, &instruction, &input, &history), output)
        };
        if response.trim().is_empty() {
            bail!("{file}:{line}: empty response (\"output\" or last assistant turn); there is nothing to learn, remove the record");
        }
        out.push((line, Example::Prompted { prompt, response: instruction_answer(template, &response) }));
    }
    Ok(out)
}

/// ShareGPT-style turns: human/gpt alternating, starting with human and ending with gpt. The
/// last exchange is the example; earlier ones become the history inside the instruction.
fn conversation(file: &str, line: usize, conv: &[ConvTurn], template: Template) -> Result<(String, String)> {
    let role = |t: &ConvTurn| -> Result<bool> {
        match t.from.to_ascii_lowercase().as_str() {
            "human" | "user" => Ok(true),
            "gpt" | "assistant" | "bot" => Ok(false),
            "system" => bail!("{file}:{line}: \"system\" turns are not supported in training data (the Alpaca template, the default, has no system slot); fold it into the first human turn"),
            other => bail!("{file}:{line}: unknown speaker `{other}` in \"conversations\"; use human/user or gpt/assistant"),
        }
    };
    if conv.is_empty() || !conv.len().is_multiple_of(2) {
        bail!("{file}:{line}: \"conversations\" must alternate human, gpt, ... and end with a gpt turn (found {} turns)", conv.len());
    }
    let mut turns = Vec::new();
    for pair in conv.chunks(2) {
        if !role(&pair[0])? || role(&pair[1])? {
            bail!("{file}:{line}: \"conversations\" must alternate human, gpt, human, gpt, ...");
        }
        turns.push(Turn { user: pair[0].value.clone(), assistant: pair[1].value.clone() });
    }
    let last = turns.pop().expect("non-empty: checked above");
    Ok((instruction_prompt(template, &last.user, "", &turns), last.assistant))
}

fn read_tokenized(file: &str, text: &str, base: usize) -> Result<Vec<(usize, Example)>> {
    #[derive(Deserialize)]
    struct Rec {
        input_ids: Vec<i64>,
        labels: Option<Vec<i64>>,
    }
    let mut out = Vec::new();
    for (line, raw) in json_records(file, text, base)? {
        let r: Rec = parse_record(file, line, raw, "a tokenized record is {\"input_ids\": [...], \"labels\": [...]}")?;
        if r.input_ids.is_empty() {
            bail!("{file}:{line}: empty \"input_ids\"; remove the record");
        }
        let mut ids = Vec::with_capacity(r.input_ids.len());
        for &id in &r.input_ids {
            if id < 0 || id > u32::MAX as i64 {
                bail!("{file}:{line}: input id {id} is not a token id");
            }
            ids.push(id as u32);
        }
        if let Some(l) = &r.labels {
            if l.len() != ids.len() {
                bail!("{file}:{line}: {} labels for {} input_ids; they must have equal length", l.len(), ids.len());
            }
        }
        out.push((line, Example::Ids { ids, labels: r.labels }));
    }
    Ok(out)
}

/// Splits a JSON array or a JSONL file into per-record slices with their starting line, so that
/// every later error (syntax or schema) can name the record's line. `base` > 0 marks a later
/// piece of a streamed JSONL file, which is lines whatever it starts with.
pub(crate) fn json_records<'a>(file: &str, text: &'a str, base: usize) -> Result<Vec<(usize, &'a str)>> {
    if base == 0 && starts_json_array(text.as_bytes()) {
        return split_json_array(file, text);
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (base + i + 1, l))
        .collect())
}

fn split_json_array<'a>(file: &str, text: &'a str) -> Result<Vec<(usize, &'a str)>> {
    let b = text.as_bytes();
    let mut line = 1usize;
    let mut i = 0usize;
    let skip_ws = |i: &mut usize, line: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            if b[*i] == b'\n' {
                *line += 1;
            }
            *i += 1;
        }
    };
    skip_ws(&mut i, &mut line);
    // Caller checked the '['.
    i += 1;
    let mut out = Vec::new();
    loop {
        skip_ws(&mut i, &mut line);
        if i >= b.len() {
            bail!("{file}:{line}: the JSON array is not closed (missing `]`)");
        }
        if b[i] == b']' && out.is_empty() {
            i += 1;
            break;
        }
        let (start, start_line) = (i, line);
        let (mut depth, mut in_str, mut esc) = (0i64, false, false);
        while i < b.len() {
            let c = b[i];
            if c == b'\n' {
                line += 1;
            }
            if in_str {
                if esc {
                    esc = false;
                } else if c == b'\\' {
                    esc = true;
                } else if c == b'"' {
                    in_str = false;
                }
            } else {
                match c {
                    b'"' => in_str = true,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' if depth > 0 => depth -= 1,
                    b',' | b']' if depth == 0 => break,
                    _ => {}
                }
            }
            i += 1;
        }
        if i >= b.len() {
            bail!("{file}:{start_line}: the JSON array is not closed (record starting here runs to the end of the file)");
        }
        let raw = text[start..i].trim_end();
        if raw.is_empty() {
            bail!("{file}:{start_line}: empty record in the JSON array (a stray or trailing comma?)");
        }
        out.push((start_line, raw));
        let sep = b[i];
        i += 1;
        if sep == b']' {
            break;
        }
    }
    skip_ws(&mut i, &mut line);
    if i < b.len() {
        bail!("{file}:{line}: unexpected text after the closing `]` of the JSON array");
    }
    Ok(out)
}

/// Parses one record, reporting serde's position relative to the whole file.
pub(crate) fn parse_record<'a, T: Deserialize<'a>>(file: &str, line: usize, raw: &'a str, hint: &str) -> Result<T> {
    serde_json::from_str(raw).map_err(|e| {
        let abs = line + e.line().saturating_sub(1);
        let msg = e.to_string();
        let suffix = format!(" at line {} column {}", e.line(), e.column());
        let msg = msg.strip_suffix(&suffix).unwrap_or(&msg);
        anyhow::anyhow!("{file}:{abs}: malformed record: {msg}; {hint}")
    })
}
