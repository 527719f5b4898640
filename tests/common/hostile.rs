//! Helpers the hostile-input tests (`hostile.rs`, `hostile_outputs.rs`) share.

use super::tiny;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
/// Every file under `root` (or `root` itself) with its bytes, to prove a run left it untouched.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if p.is_dir() {
            out.insert(p.clone(), Vec::new());
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        }
    }
    out
}
/// A recipe that loads, with every section whose numbers the property tests vary.
pub fn base_recipe(dir: &Path) -> String {
    std::fs::write(dir.join("zh.txt"), "你好世界。\n").unwrap();
    format!(
        r#"[model]
path = "{base}"
[vocab]
extension = "{ext}"
[lora]
[train]
[precision]
[mix]
[output]
dir = "out"
[[data]]
kind = "text"
path = "zh.txt"
"#,
        base = s(&tiny().join("base")),
        ext = s(&tiny().join("vocab_extension.json"))
    )
}
