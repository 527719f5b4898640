//! Broken inputs give errors that name the file and the tensor or key, never panics.

mod common;
use common::*;
use linly_lora::io::safetensors::{encode_f32, write_all, FloatType, SafetensorsFile};
use linly_lora::model::Llama;
use std::path::Path;

fn copy_base(to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny().join("base").join(f), to.join(f)).unwrap();
    }
}

/// Rewrites `dir/config.json` through `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(p, cfg.to_string()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match Llama::load(dir, &cpu(), FloatType::F32) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_base(dir.path());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn header_lying_about_offsets() {
    let dir = tempfile::tempdir().unwrap();
    copy_base(dir.path());
    let p = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    // Shift one tensor's end offset: the tensors no longer tile the data section.
    let i = header.find("\"data_offsets\":[").unwrap() + "\"data_offsets\":[".len();
    let j = i + header[i..].find(']').unwrap();
    let parts: Vec<usize> = header[i..j].split(',').map(|x| x.trim().parse().unwrap()).collect();
    let fake = format!("{},{}", parts[0], parts[1] + 4);
    let new_header = format!("{}{}{}", &header[..i], fake, &header[j..]);
    let mut out = (new_header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(new_header.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&p, &out).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn wrong_shape_names_tensor() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("base/config.json"), dir.path().join("config.json")).unwrap();
    rewrite_safetensors(&tiny().join("base/model.safetensors"), &dir.path().join("model.safetensors"), |n, mut shape, mut v| {
        if n == "model.layers.1.mlp.up_proj.weight" {
            shape[0] -= 1;
            v.truncate(shape[0] * shape[1]);
        }
        Some((n.to_string(), FloatType::F32, shape, v))
    });
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("[175, 64]") && e.contains("[176, 64]"), "{e}");
}

#[test]
fn missing_tensor_names_tensor() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("base/config.json"), dir.path().join("config.json")).unwrap();
    rewrite_safetensors(&tiny().join("base/model.safetensors"), &dir.path().join("model.safetensors"), |n, shape, v| {
        (n != "model.norm.weight").then(|| (n.to_string(), FloatType::F32, shape, v))
    });
    let e = load_err(dir.path());
    assert!(e.contains("missing tensor `model.norm.weight`"), "{e}");
}

#[test]
fn missing_config_key() {
    let dir = tempfile::tempdir().unwrap();
    copy_base(dir.path());
    edit_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = load_err(dir.path());
    assert!(e.contains("num_hidden_layers") && e.contains("config.json"), "{e}");
}

#[test]
fn missing_folder_and_garbage_config() {
    let e = load_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model/config.json"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    copy_base(dir.path());
    std::fs::write(dir.path().join("config.json"), "{not json").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("not a valid config.json"), "{e}");
}

#[test]
fn sharded_checkpoint_loads_and_bad_index_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tiny().join("base/config.json"), dir.path().join("config.json")).unwrap();
    let src = SafetensorsFile::open(&tiny().join("base/model.safetensors")).unwrap();
    let names = src.names();
    let mut map = serde_json::Map::new();
    for (k, chunk) in names.chunks(names.len() / 2 + 1).enumerate() {
        let shard = format!("model-0000{}-of-00002.safetensors", k + 1);
        let tensors: Vec<_> = chunk
            .iter()
            .map(|n| {
                let r = src.require(n).unwrap();
                map.insert(n.clone(), shard.clone().into());
                (n.clone(), "F16".to_string(), r.shape.to_vec(), encode_f32(&r.to_f32().unwrap(), FloatType::F16))
            })
            .collect();
        write_all(&dir.path().join(&shard), &tensors, None).unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let model = Llama::load(dir.path(), &cpu(), FloatType::F32).unwrap();
    let exp = Expected::load();
    let got = logits_of(&model, &exp.ids("input_ids"));
    let (want, _) = exp.f32("base_logits");
    assert!(rel_err(&got, &want) < 1e-2);
    // An index pointing at a shard that lacks the tensor.
    map.insert("model.norm.weight".into(), "model-00001-of-00002.safetensors".into());
    let index = serde_json::json!({"weight_map": map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.norm.weight") && e.contains("index"), "{e}");
}

#[test]
fn unknown_rope_type_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    copy_base(dir.path());
    edit_config(dir.path(), |c| c["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0}));
    let e = load_err(dir.path());
    assert!(e.contains("dynamic") && e.contains("linear"), "{e}");
}

/// A folder with both a single weights file and a shard index is ambiguous (a re-sharding left
/// one behind): refused by name, not loaded from whichever one was looked at first.
#[test]
fn single_file_beside_a_shard_index() {
    let dir = tempfile::tempdir().unwrap();
    copy_base(dir.path());
    std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map": {}}"#).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("holds both model.safetensors and model.safetensors.index.json"), "{e}");
}
