//! The `linly-lora` command line: glue that turns each subcommand's flags (their clap
//! definitions are in `cli/`) into the options of its one function in [`linly_lora::commands`]
//! and prints the report with [`linly_lora::commands::emit`]. Policy and formatting live there,
//! not here.

mod cli;

use anyhow::Result;
use clap::Parser;
use cli::{AdapterCmd, BenchCmd, BenchModel, Cli, Cmd, DataCmd, ExportCmd, ImportCmd, VocabCmd};
use linly_lora::commands::{self, bench, emit, emit_or_json, infer as cinfer, quant as cquant, vocab as cvocab};

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Serve(..) | Cmd::Bench { what: BenchCmd::Serve { .. } }) {
        // `linly-lora eval ... | head` should end quietly, as Unix tools do, instead of panicking
        // in println! on the closed pipe. Not for `serve`, whose sockets must survive clients
        // that hang up.
        // SAFETY: restoring the default disposition of a signal before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Eval(a) => {
            let input = match (a.text, a.ids) {
                (Some(t), _) => cinfer::EvalInput::Text(t),
                (_, Some(i)) => cinfer::EvalInput::Ids(i),
                _ => unreachable!("clap requires one"),
            };
            emit_or_json(&cinfer::eval(&cinfer::EvalOptions { spec: a.m.spec(), input, window: a.window, per_token: a.per_token })?, a.json)
        }
        Cmd::Generate(a) => {
            let prompt = match (a.prompt, a.prompt_ids) {
                (_, Some(ids)) => cinfer::Prompt::Ids(ids),
                (Some(p), _) => cinfer::Prompt::Text(p),
                _ => unreachable!("clap requires one"),
            };
            let o = cinfer::GenerateCommand { spec: a.m.spec(), prompt, sampling: a.s.sampling(), print_ids: a.print_ids };
            let r = cinfer::generate(&o, &mut std::io::stdout().lock())?;
            emit(&r)
        }
        Cmd::Chat(a) => {
            let o = cinfer::ChatOptions { spec: a.m.spec(), template: a.template, system: a.system, sampling: a.s.sampling() };
            cinfer::chat(&o, &mut std::io::stdin().lock(), &mut std::io::stdout())
        }
        Cmd::Train(a) => {
            let o = commands::train::TrainOptions { recipe: a.recipe, resume: a.resume, progress: !a.quiet, stop_after: a.stop_after, stop: None };
            emit(&commands::train::train(&o)?)
        }
        Cmd::Merge(a) => {
            let o = commands::lora::MergeCommand {
                base: a.base,
                adapters: a.adapters,
                out: a.out,
                force: a.force,
                dtype: a.dtype,
                tokenizer: a.tokenizer,
                shard_size: a.shard_size,
                allow_vocab_padding: a.allow_vocab_padding,
            };
            emit(&commands::lora::merge(&o)?)
        }
        Cmd::Adapter { what: AdapterCmd::Pack { adapter, out, dtype, rank, force } } => emit(&commands::lora::pack(&commands::lora::PackOptions { adapter, out, dtype, rank, force })?),
        Cmd::Vocab { what } => vocab(what),
        Cmd::Data { what: DataCmd::Prepare { recipe, quiet } } => emit(&commands::train::prepare_data(&commands::train::PrepareDataOptions { recipe, progress: !quiet })?),
        Cmd::Import { what: ImportCmd::Gguf { file, out, dtype, force } } => emit(&commands::gguf::import_gguf(&commands::gguf::ImportOptions { file, out, dtype, force })?),
        Cmd::Serve(a) => commands::serve::serve(&commands::serve::ServeOptions {
            spec: a.m.spec(),
            host: a.host,
            port: a.port,
            max_concurrent: a.max_concurrent,
            queue_size: a.queue_size,
            api_key: a.api_key,
            template: a.template,
            default_max_tokens: a.default_max_tokens,
            max_body_bytes: a.max_body_bytes,
            model_name: a.model_name,
            kv: a.kv_cache,
        }),
        Cmd::Quantize(a) => {
            let o = cquant::QuantizeOptions { model: a.model, format: a.format, out: a.out, force: a.force, quant: a.q.settings() };
            emit(&cquant::quantize(&o)?)
        }
        Cmd::Imatrix(a) => {
            let o = cquant::ImatrixOptions { model: a.model, text: a.text, window: a.window, max_tokens: a.max_tokens, out: a.out, force: a.force };
            emit(&cquant::imatrix(&o)?)
        }
        Cmd::Export { what: ExportCmd::Gguf { model, out, force, ty, q } } => emit(&cquant::export_gguf(&cquant::ExportOptions { model, out, force, ty, quant: q.settings() })?),
        Cmd::Bench { what } => bench(what),
    }
}

fn bench(cmd: BenchCmd) -> Result<()> {
    let random = |m: BenchModel| bench::RandomModel { shape: m.shape, device: m.device, dtype: m.dtype };
    match cmd {
        BenchCmd::Forward { m, prompt, decode, reps } => emit(&bench::forward_command(&bench::ForwardOptions { model: random(m), prompt, decode, reps })?),
        BenchCmd::Train { m, rank, batch, seq, warmup, steps } => emit(&bench::train_command(&bench::TrainOptions { model: random(m), rank, batch, seq, warmup, steps })?),
        BenchCmd::Scaler { workdir, tokenizer, wordlist, data, steps, lr, random_std, inits } => {
            emit(&bench::scaler_command(&bench::scaler::ScalerBenchOptions { workdir, tokenizer, wordlist, data, steps, lr, random_std, inits })?)
        }
        BenchCmd::Serve { m, clients, max_tokens, requests, temperature, rounds, kv_cache } => {
            let o = bench::serve::ServeBenchOptions { spec: m.spec(), clients, max_tokens, requests_per_client: requests, temperature, rounds: rounds as usize, kv: kv_cache };
            emit(&bench::serve_command(&o)?)
        }
        BenchCmd::Quant { model, prompt, gen, reps, threads } => emit(&bench::quant_command(&bench::QuantOptions { model, prompt, gen, reps, threads })?),
        BenchCmd::Merge { shape, rank, workdir, keep } => emit(&bench::merge_command(&bench::MergeOptions { shape, rank, workdir, keep })?),
    }
}

fn vocab(cmd: VocabCmd) -> Result<()> {
    match cmd {
        VocabCmd::Extend { tokenizer, add, from_corpus, max_new, max_chars, min_freq, wordlist, max_word_chars, pairs, prefixed, out, force, json } => {
            let pieces = match add {
                Some(f) => cvocab::Pieces::List(f),
                None => cvocab::Pieces::Select { corpus: from_corpus, wordlist, max_new, max_chars, min_freq, max_word_chars, pairs, prefixed },
            };
            emit_or_json(&cvocab::extend(&cvocab::ExtendOptions { tokenizer, pieces, out, force })?, json)
        }
        VocabCmd::Resize { model, extension, init, seed, init_text, init_steps, init_tokens, init_head_tokens, init_input_epochs, init_input_lr, init_head_epochs, init_head_lr, init_head_targets, init_keep_old_rows, device, out, force } => {
            let distill = linly_lora::vocab::distill::DistillOptions {
                tokens: init_tokens,
                head_tokens: init_head_tokens,
                input_epochs: init_input_epochs,
                input_lr: init_input_lr,
                head_epochs: init_head_epochs,
                head_lr: init_head_lr,
                head_targets: init_head_targets,
                move_old_rows: !init_keep_old_rows,
                seed,
                ..Default::default()
            };
            let o = cvocab::ResizeOptions { model, extension, init: init.parse()?, seed, init_text, fit_steps: init_steps, distill, device, out, force };
            emit(&cvocab::resize(&o)?)
        }
        VocabCmd::CopyTask { tokenizer, examples, min_pieces, max_pieces, char_share, seed, instruction, out, force } => {
            let cfg = linly_lora::vocab::CopyTaskConfig { examples, min_pieces, max_pieces, char_share, seed, instruction };
            emit(&cvocab::copy_task(&cvocab::CopyTaskOptions { tokenizer, cfg, out, force })?)
        }
        VocabCmd::Cover { tokenizer, text, tokens, min_count, min_chars, out, force } => {
            let cfg = linly_lora::vocab::CoverConfig { tokens, min_count };
            emit(&cvocab::cover(&cvocab::CoverOptions { tokenizer, text, cfg, min_chars, out, force })?)
        }
        VocabCmd::Stats { tokenizers, texts, json } => emit_or_json(&cvocab::stats(&cvocab::StatsOptions { tokenizers, texts })?, json),
        VocabCmd::Encode { tokenizer, text } => emit(&cvocab::encode(&cvocab::EncodeOptions { tokenizer, text })?),
    }
}
