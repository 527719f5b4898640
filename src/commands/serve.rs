//! `serve`.

pub use crate::serve::ServeOptions;
use anyhow::Result;

/// Runs until Ctrl-C or SIGTERM; prints the address once it listens (port 0 picks one, and
/// scripts read it from this line).
pub fn serve(o: &ServeOptions) -> Result<()> {
    crate::serve::serve(o, |addr, st| {
        println!("linly-lora serve: {} ({:?} template) listening on http://{addr}", st.model_id(), st.template());
    })
}
