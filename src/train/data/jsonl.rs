//! JSON lines of `{image, caption[, split]}` objects.

use super::*;

pub(super) fn load_jsonl(path: &Path, image_base: Option<&Path>, split: Split) -> Result<Loaded> {
    let text = read_text(path)?;
    let base = image_base.map(Path::to_path_buf).unwrap_or_else(|| parent_dir(path));
    let mut skipped = SkipCounts::default();
    let mut rows = Vec::new();
    let mut hashed = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
            skipped.bad_row += 1;
            continue;
        };
        let image = ["image", "file_name", "filename"].iter().find_map(|k| value_str(obj.get(*k))).map(str::trim).filter(|s| !s.is_empty());
        let Some(image) = image else {
            skipped.bad_row += 1;
            continue;
        };
        // The split comes first so a broken row of another split is not charged to this one.
        let row_split = match obj.get("split") {
            None | Some(Value::Null) => {
                hashed = true;
                hash_split(image)
            }
            Some(v) => match v.as_str().and_then(Split::from_field) {
                Some(sp) => sp,
                None => {
                    skipped.bad_row += 1;
                    continue;
                }
            },
        };
        if row_split != split {
            continue;
        }
        let mut captions: Vec<String> = Vec::new();
        let mut any = false;
        match obj.get("caption") {
            Some(Value::String(c)) => {
                captions.push(c.clone());
                any = true;
            }
            Some(Value::Null) | None => {}
            Some(_) => skipped.bad_row += 1,
        }
        match obj.get("captions") {
            Some(Value::Array(list)) => {
                any = true;
                for c in list {
                    match c {
                        Value::String(c) => captions.push(c.clone()),
                        _ => skipped.bad_row += 1,
                    }
                }
            }
            Some(Value::String(c)) => {
                captions.push(c.clone());
                any = true;
            }
            Some(Value::Null) | None => {}
            Some(_) => skipped.bad_row += 1,
        }
        if !any {
            skipped.bad_row += 1;
            continue;
        }
        let image = base.join(image);
        rows.extend(captions.into_iter().map(|caption| RawRow { image: image.clone(), caption }));
    }
    Ok(Loaded { name: file_dataset_name("jsonl", path, hashed), rows, skipped })
}
