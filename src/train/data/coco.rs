//! COCO / Flickr30k captions JSON (`images` + `annotations`).

use super::*;

// Fields are loose `Value`s so one entry of the wrong type is a bad row, not a failed file;
// everything else in the file (licenses, info, sizes) is skipped by serde without allocating.
#[derive(Deserialize)]
pub(super) struct CocoFile {
    images: Option<Vec<CocoImage>>,
    annotations: Option<Vec<CocoAnnotation>>,
}

#[derive(Deserialize)]
pub(super) struct CocoImage {
    id: Option<Value>,
    file_name: Option<Value>,
    split: Option<Value>,
}

#[derive(Deserialize)]
pub(super) struct CocoAnnotation {
    image_id: Option<Value>,
    caption: Option<Value>,
}

pub(super) fn coco_tags(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train2017", "train2014"],
        Split::Val => &["val2017", "val2014"],
        // COCO publishes no test captions; its val file is the usual stand-in.
        Split::Test => &["test2017", "test2014", "val2017", "val2014"],
    }
}

/// Which split a file name announces (`captions_val2017.json` → val), if exactly one.
pub(super) fn split_token(file_name: &str) -> Option<(Split, &'static str)> {
    let tokens = [(Split::Train, "train"), (Split::Val, "val"), (Split::Test, "test")];
    let mut found = tokens.iter().filter(|(_, t)| file_name.contains(t));
    match (found.next(), found.next()) {
        (Some(&one), None) => Some(one),
        _ => None,
    }
}

/// Replaces the first ASCII-case-insensitive `from` in `name`, keeping the rest as written so
/// the sibling is found on case-sensitive file systems.
pub(super) fn replace_ascii_ci(name: &str, from: &str, to: &str) -> String {
    match name.to_ascii_lowercase().find(from) {
        // ASCII lowercasing keeps byte offsets, so the range is valid in `name` too.
        Some(at) if name.is_char_boundary(at) && name.is_char_boundary(at + from.len()) => {
            format!("{}{to}{}", &name[..at], &name[at + from.len()..])
        }
        _ => name.to_string(),
    }
}

pub(super) fn load_coco(location: &Path, image_base: Option<&Path>, split: Split) -> Result<Loaded> {
    if !location.exists() {
        return Err(Error::MissingFile(location.display().to_string()));
    }
    // How the requested split is drawn from the chosen file.
    enum Take {
        Whole,
        Hash,
    }
    let (json_path, take, note) = if location.is_dir() {
        let mut looked = Vec::new();
        let mut chosen = None;
        'search: for tag in coco_tags(split) {
            for dir in [location.join("annotations"), location.to_path_buf()] {
                let p = dir.join(format!("captions_{tag}.json"));
                if p.is_file() {
                    chosen = Some(p);
                    break 'search;
                }
                looked.push(p.display().to_string());
            }
        }
        let path = chosen.ok_or_else(|| Error::MissingFile(looked.join(" or ")))?;
        let note = if split == Split::Test && file_name_lower(&path).contains("val") { " (test = val: COCO has no test captions)" } else { "" };
        (path, Take::Whole, note)
    } else {
        let name = location.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        match split_token(&name.to_ascii_lowercase()) {
            Some((own, _)) if own == split => (location.to_path_buf(), Take::Whole, ""),
            Some((own, own_token)) => {
                // A file named for one split answers for the others through its siblings
                // (captions_train2017.json → captions_val2017.json), never by reusing its rows.
                let wanted: &[(&str, &str)] = match split {
                    Split::Train => &[("train", "")],
                    Split::Val => &[("val", "")],
                    Split::Test => &[("test", ""), ("val", " (test = val: no test captions file)")],
                };
                let sibling = wanted.iter().find_map(|(token, note)| {
                    let sib = parent_dir(location).join(replace_ascii_ci(&name, own_token, token));
                    sib.is_file().then_some((sib, *note))
                });
                match sibling {
                    Some((path, note)) => (path, Take::Whole, note),
                    None => {
                        return Err(Error::config(
                            &location.display().to_string(),
                            format!(
                                "this file holds the {own} split and there is no {split} \
                                 captions file next to it"
                            ),
                        ))
                    }
                }
            }
            None => (location.to_path_buf(), Take::Hash, ""),
        }
    };

    let shown = json_path.display().to_string();
    let file: CocoFile = parse_json_file(&json_path)?;
    let (Some(images), Some(annotations)) = (file.images, file.annotations) else {
        return Err(Error::config(&shown, "not a COCO captions file: needs `images` and `annotations` arrays"));
    };

    let mut skipped = SkipCounts::default();
    let mut hashed = false;
    // Per image: its file name (None when the entry is unusable) and whether it is in the split.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut entries: Vec<(Option<String>, bool)> = Vec::with_capacity(images.len());
    for img in &images {
        let file_name = value_str(img.file_name.as_ref()).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string);
        let in_split = match (value_str(img.split.as_ref()), &file_name) {
            (Some(s), _) => Split::from_field(s) == Some(split),
            (None, Some(f)) => match take {
                Take::Whole => true,
                Take::Hash => {
                    hashed = true;
                    hash_split(f) == split
                }
            },
            (None, None) => false,
        };
        if let Some(id) = value_key(img.id.as_ref()) {
            by_id.entry(id).or_insert(entries.len());
        }
        entries.push((file_name, in_split));
    }

    let mut captions: Vec<Vec<String>> = vec![Vec::new(); entries.len()];
    for ann in annotations {
        let target = value_key(ann.image_id.as_ref()).and_then(|id| by_id.get(&id).copied());
        let Some(i) = target else {
            skipped.bad_row += 1;
            continue;
        };
        match (entries.get(i), ann.caption) {
            (Some((Some(_), true)), Some(Value::String(c))) => {
                if let Some(list) = captions.get_mut(i) {
                    list.push(c);
                }
            }
            (Some((Some(_), false)), _) => {}
            _ => skipped.bad_row += 1,
        }
    }

    // The split's own image folder is the likeliest home, so it leads; the JSON's own folder
    // follows for hand-made files that sit beside their images.
    let json_dir = parent_dir(&json_path);
    let mut dirs: Vec<PathBuf> = image_base.map(Path::to_path_buf).into_iter().collect();
    let stem = file_name_lower(&json_path);
    let own_tag = stem.trim_start_matches("captions_").trim_end_matches(".json").to_string();
    let up = json_dir.join("..");
    for tag in [own_tag.as_str(), "train2017", "val2017", "train2014", "val2014"] {
        if !tag.is_empty() {
            dirs.push(up.join(tag));
            dirs.push(json_dir.join(tag));
        }
    }
    dirs.extend([json_dir.clone(), json_dir.join("images"), up.join("images")]);
    let mut resolver = Resolver::new(dirs);

    let mut rows = Vec::new();
    for ((file_name, _), list) in entries.into_iter().zip(captions) {
        let (Some(file_name), false) = (file_name, list.is_empty()) else {
            continue;
        };
        let path = resolver.resolve(&[PathBuf::from(file_name)]);
        rows.extend(list.into_iter().map(|caption| RawRow { image: path.clone(), caption }));
    }
    let file = json_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| shown.clone());
    let mut name = format!("coco {file}{note}");
    if hashed {
        name.push_str(&format!(" ({HASH_SPLIT_NOTE})"));
    }
    Ok(Loaded { name, rows, skipped })
}
