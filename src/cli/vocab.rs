//! `linly-lora vocab`: extending a tokenizer, resizing a model for it, measuring it.

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum VocabCmd {
    /// Add pieces as real BPE entries with merges (not "added tokens"); writes tokenizer.json and vocab_extension.json
    #[command(group(clap::ArgGroup::new("pieces").required(true).multiple(true).args(["add", "from_corpus", "wordlist"])))]
    Extend {
        /// tokenizer.json or the folder holding it (SentencePiece-style or byte-level BPE)
        #[arg(long)]
        tokenizer: PathBuf,
        /// File of new pieces, one per line
        #[arg(long, conflicts_with_all = ["from_corpus", "wordlist"])]
        add: Option<PathBuf>,
        /// Choose frequent characters and words by their counts in this text (repeatable); without it,
        /// by the --wordlist's own frequency column
        #[arg(long)]
        from_corpus: Vec<PathBuf>,
        /// How many pieces to add in corpus mode (split 8:20 between characters and words, as Linly)
        #[arg(long, default_value_t = 28_000)]
        max_new: usize,
        /// How many of --max-new may be single characters (default: 8/28 of it, as Linly); the
        /// rest go to words. Fewer characters leave rare ones to the base's byte pieces
        #[arg(long)]
        max_chars: Option<usize>,
        /// Ignore characters/words seen fewer times than this
        #[arg(long, default_value_t = 2)]
        min_freq: u64,
        /// Word list for candidate words (`word freq POS` per line, e.g. jieba's dict.txt)
        #[arg(long)]
        wordlist: Option<PathBuf>,
        /// Longest word, in characters
        #[arg(long, default_value_t = 4)]
        max_word_chars: usize,
        /// Corpus mode: also consider pairs of adjacent words/characters (`我的`, `的人`) as
        /// candidates, counted in the corpus; off keeps to the word list's words
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        pairs: bool,
        /// SentencePiece tokenizers: also add ▁+piece for this many text-initial pieces (taken from the word budget)
        #[arg(long, default_value_t = 0)]
        prefixed: usize,
        /// Output folder (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Grow embed_tokens and lm_head for a vocab_extension.json (new rows: sub-token mean by default)
    Resize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        extension: PathBuf,
        /// subtoken-mean | mean | noisy-mean | random: table-only. distill | distill-input |
        /// distill-head: fitted against the model on --init-text (input rows by Token
        /// Distillation, head rows to the base's own probability of each piece; fitting the head
        /// unties a tied table). See src/vocab/distill/. fit: the new rows trained end to end
        /// towards the base's own distribution on --init-text, layers and old rows frozen
        /// (--init-steps rows of 256 tokens; ~2.3 s a row on 2 CPU cores, 30 min for the
        /// default 800); a tied table stays tied. See src/train/fit_rows.rs.
        #[arg(long, default_value = "subtoken-mean")]
        init: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Training text of the new language that the model-based methods read (never the text
        /// you evaluate on). fit takes it more than once (the files weigh equally); the distill
        /// methods take one
        #[arg(long)]
        init_text: Vec<PathBuf>,
        /// fit: rows of 256 tokens (the context, if shorter) the new rows train on
        #[arg(long, default_value_t = linly_lora::train::fit_rows::FIT_STEPS)]
        init_steps: usize,
        /// Tokens of context (new tokenization) the distill methods fit on
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().tokens)]
        init_tokens: usize,
        /// Further tokens of context whose positions the head rows are fitted on (distill, distill-head)
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_tokens)]
        init_head_tokens: usize,
        /// Passes over the contexts for the input rows (distill, distill-input)
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().input_epochs)]
        init_input_epochs: usize,
        /// Adam learning rate of the input rows
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().input_lr)]
        init_input_lr: f64,
        /// Passes over the cached positions for the head rows (distill, distill-head)
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_epochs)]
        init_head_epochs: usize,
        /// Adam step of the head rows, in nats of logit per step
        #[arg(long, default_value_t = linly_lora::vocab::distill::DistillOptions::default().head_lr)]
        init_head_lr: f64,
        /// What the head rows are fitted to: chain (the base's own probability of every piece,
        /// the mass of a piece's first sub-token moved onto it) or labels (the next piece of the
        /// text, one-hot; only rows that occur learn)
        #[arg(long, value_enum, default_value = "chain")]
        init_head_targets: linly_lora::vocab::distill::HeadTargets,
        /// With chain targets, leave the old head rows of the new pieces' first sub-tokens as they
        /// are (by default they are fitted too, and adapters carry them)
        #[arg(long)]
        init_keep_old_rows: bool,
        /// Device the distill methods run on
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Output model folder (must not exist unless --force; written atomically)
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out once the new output is complete (never one of the inputs)
        #[arg(long)]
        force: bool,
    },
    /// Write "repeat this text" examples of random added pieces (Alpaca JSON) that teach the new rows to be copied
    #[command(long_about = "Write \"repeat this text\" examples made of random added pieces, as an Alpaca JSON \
that a recipe trains on as a `kind = \"alpaca\"` block with a chat template (the prompt is masked, so the loss \
falls on the copy alone).\n\nWhy: a model reads a repeated name or term again almost for free by copying it \
from earlier in the context. New rows cannot be copied at first, and ordinary text teaches it only for the \
pieces it shows often; on the quickstart, repeated pieces carried most of the trained model's gap to the base \
(BENCHMARKS.md, \"Repeats\"). Pieces are drawn uniformly over the extension, characters with probability \
--char-share, so that rare rows learn it too. Merge-only rows (byte fragments no text spells) are left out.\n\n\
Measured on the quickstart at weight 0.1: the copy is learnt, but the texts' bits/char did not improve beyond \
the spread of runs, so the quickstart's recipe does not use it; check it on your validation text.")]
    CopyTask {
        /// The extended tokenizer's folder, as `vocab extend` wrote it (tokenizer.json + vocab_extension.json)
        #[arg(long)]
        tokenizer: PathBuf,
        /// How many examples (the quickstart reads a few hundred; the rest is for longer runs)
        #[arg(long, default_value_t = 6000, value_parser = super::at_least::<1>)]
        examples: usize,
        /// Fewest added pieces per example
        #[arg(long, default_value_t = 20)]
        min_pieces: usize,
        /// Most added pieces per example
        #[arg(long, default_value_t = 60)]
        max_pieces: usize,
        /// Probability that a drawn piece is a single character rather than a word
        #[arg(long, default_value_t = 0.6)]
        char_share: f64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// The instruction of every example (masked in training)
        #[arg(long, default_value = linly_lora::vocab::DEFAULT_INSTRUCTION)]
        instruction: String,
        /// Output JSON file (written atomically; must not exist unless --force)
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Pick the documents of a training text that show the most added pieces, up to a token budget
    #[command(long_about = "Pick the documents (blank-line-separated blocks) of a training text that show the \
most added pieces of an extended tokenizer, up to --tokens training tokens, and write them in file order to \
--out, for a recipe's `kind = \"text\"` block.\n\nWhy: a CPU run reads ~100k tokens, and a random draw of them \
shows most of ~30k added pieces fewer than five times; the pieces training rarely shows carry much of the \
extended model's gap to the base. Documents are taken greedily by how many occurrences of pieces not yet shown \
--min-count times they hold per token, so the budget goes where it teaches the most rows. Documents shorter than \
--min-chars are left out, so that headlines and bylines do not win by being short.\n\nSet --tokens to about \
what the run reads from this source (the quickstart: ~500 steps x 256 tokens x its share); a run that reads \
more goes through the choice again. The report compares the choice with a random draw of the same tokens. The \
text is read whole (a few MB of news takes about a second). On \
the quickstart (BENCHMARKS.md, \"A run that shows more of the new pieces\") two runs with one seed were \
0.06-0.07 bit/char better on news-register validation text than the whole news; two seeds of one recipe \
differ by ~0.07, so that gain is at the edge of a run's spread (BENCHMARKS.md, \"How much news to choose\").")]
    Cover {
        /// The extended tokenizer's folder, as `vocab extend` wrote it (tokenizer.json + vocab_extension.json)
        #[arg(long)]
        tokenizer: PathBuf,
        /// The training text (documents separated by blank lines)
        #[arg(long)]
        text: PathBuf,
        /// Training tokens to choose (BOS and EOS of each document counted)
        #[arg(long, default_value_t = 60_000)]
        tokens: usize,
        /// A piece stops counting once the choice shows it this many times
        #[arg(long, default_value_t = 5)]
        min_count: usize,
        /// Documents shorter than this many characters are not candidates
        #[arg(long, default_value_t = 100)]
        min_chars: usize,
        /// Output text file (written atomically; must not exist unless --force)
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        force: bool,
    },
    /// Tokens per character, byte-fallback tokens and round-trip failures, per tokenizer × file
    Stats {
        #[arg(long = "tokenizer", required = true)]
        tokenizers: Vec<PathBuf>,
        #[arg(long = "text", required = true)]
        texts: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Print the ids and pieces of a string
    Encode {
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long)]
        text: String,
    },
}
