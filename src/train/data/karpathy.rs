//! Karpathy's split files (`dataset_coco.json`, `dataset_flickr8k.json`, `dataset_flickr30k.json`).

use super::*;

pub(super) const KARPATHY_FILES: [&str; 3] = ["dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json"];

#[derive(Deserialize)]
pub(super) struct KarpathyFile {
    images: Option<Vec<KarpathyImage>>,
}

#[derive(Deserialize)]
pub(super) struct KarpathyImage {
    filepath: Option<Value>,
    filename: Option<Value>,
    split: Option<Value>,
    sentences: Option<Value>,
}

pub(super) fn load_karpathy(location: &Path, image_base: Option<&Path>, split: Split) -> Result<Loaded> {
    if !location.exists() {
        return Err(Error::MissingFile(location.display().to_string()));
    }
    let (json_path, root) = if location.is_dir() {
        let found: Vec<PathBuf> = KARPATHY_FILES.iter().map(|f| location.join(f)).filter(|p| p.is_file()).collect();
        match found.as_slice() {
            [one] => (one.clone(), location.to_path_buf()),
            [] => {
                return Err(Error::MissingFile(
                    KARPATHY_FILES.iter().map(|f| location.join(f).display().to_string()).collect::<Vec<_>>().join(" or "),
                ))
            }
            // The official zip unpacks all three side by side; guessing would train on the
            // wrong corpus without a word.
            _ => return Err(Error::config(&location.display().to_string(), "several Karpathy split files here; pass the one to use as the path")),
        }
    } else {
        (location.to_path_buf(), parent_dir(location))
    };
    let shown = json_path.display().to_string();
    let file: KarpathyFile = parse_json_file(&json_path)?;
    let images = file.images.ok_or_else(|| Error::config(&shown, "not a Karpathy split file: needs an `images` array"))?;

    let root = image_base.map(Path::to_path_buf).unwrap_or(root);
    let dirs = ["", "images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k-images", "flickr30k_images"]
        .iter()
        .map(|d| if d.is_empty() { root.clone() } else { root.join(d) })
        .collect();
    let mut resolver = Resolver::new(dirs);

    let mut skipped = SkipCounts::default();
    let mut hashed = false;
    let mut rows = Vec::new();
    for img in images {
        let filename = value_str(img.filename.as_ref()).map(str::trim).filter(|s| !s.is_empty());
        let Some(filename) = filename else {
            skipped.bad_row += 1;
            continue;
        };
        let img_split = match value_str(img.split.as_ref()) {
            Some(s) => match Split::from_field(s) {
                Some(sp) => sp,
                None => {
                    skipped.bad_row += 1;
                    continue;
                }
            },
            None => {
                hashed = true;
                hash_split(filename)
            }
        };
        if img_split != split {
            continue;
        }
        let Some(Value::Array(sentences)) = img.sentences else {
            skipped.bad_row += 1;
            continue;
        };
        let mut rels = Vec::new();
        if let Some(fp) = value_str(img.filepath.as_ref()).map(str::trim).filter(|s| !s.is_empty()) {
            rels.push(Path::new(fp).join(filename));
        }
        rels.push(PathBuf::from(filename));
        let path = resolver.resolve(&rels);
        for sentence in sentences {
            // `raw` keeps the original casing and punctuation; `tokens` is only a fallback.
            let text = match sentence.get("raw") {
                Some(Value::String(raw)) => Some(raw.clone()),
                _ => sentence
                    .get("tokens")
                    .and_then(Value::as_array)
                    .and_then(|t| t.iter().map(|w| w.as_str()).collect::<Option<Vec<_>>>().map(|w| w.join(" "))),
            };
            match text {
                Some(caption) => rows.push(RawRow { image: path.clone(), caption }),
                None => skipped.bad_row += 1,
            }
        }
    }
    Ok(Loaded { name: file_dataset_name("karpathy", &json_path, hashed), rows, skipped })
}
