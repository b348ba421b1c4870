//! Flickr8k: `Flickr8k.token.txt` + the split files, or Kaggle's `captions.txt`.

use super::*;

pub(super) const FLICKR_TOKEN: &str = "Flickr8k.token.txt";
pub(super) const KAGGLE_CAPTIONS: &str = "captions.txt";
pub(super) const FLICKR_IMAGE_DIRS: [&str; 4] = ["Flicker8k_Dataset", "Flickr8k_Dataset", "Images", "images"];
pub(super) const FLICKR_SPLIT_FILES: [&str; 3] = ["Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"];

/// The official zip puts the text files in Flickr8k_text/ next to the image folder.
pub(super) fn flickr_text_dirs(root: &Path) -> [PathBuf; 2] {
    [root.to_path_buf(), root.join("Flickr8k_text")]
}

pub(super) fn flickr_captions_present(root: &Path) -> bool {
    flickr_text_dirs(root).iter().any(|d| d.join(FLICKR_TOKEN).is_file()) || root.join(KAGGLE_CAPTIONS).is_file()
}

pub(super) fn load_flickr(location: &Path, split: Split) -> Result<Loaded> {
    let root = if location.is_file() { parent_dir(location) } else { location.to_path_buf() };
    if !root.is_dir() {
        return Err(Error::MissingFile(root.display().to_string()));
    }
    let shown = root.display().to_string();
    let text_dirs = flickr_text_dirs(&root);
    let image_dir = FLICKR_IMAGE_DIRS
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .ok_or_else(|| Error::config(&shown, format!("no Flickr8k image folder: looked for {}", FLICKR_IMAGE_DIRS.join(", "))))?;

    let mut skipped = SkipCounts::default();
    let mut name = String::from("flickr8k");
    let token = text_dirs.iter().map(|d| d.join(FLICKR_TOKEN)).find(|p| p.is_file());
    let entries: Vec<(String, String)> = if let Some(token) = token {
        parse_flickr_token(&read_text(&token)?, &mut skipped)
    } else {
        let kaggle = root.join(KAGGLE_CAPTIONS);
        if !kaggle.is_file() {
            return Err(Error::config(&shown, format!("no Flickr8k captions: looked for {FLICKR_TOKEN} and {KAGGLE_CAPTIONS}")));
        }
        name.push_str(" (captions.txt)");
        let table = CsvTable::parse(&read_text(&kaggle)?, &kaggle)?;
        table.rows(&mut skipped).map(|r| (r.image.trim().to_string(), r.caption)).collect()
    };

    let split_paths: Vec<Option<PathBuf>> = FLICKR_SPLIT_FILES.iter().map(|f| text_dirs.iter().map(|d| d.join(f)).find(|p| p.is_file())).collect();
    let wanted: Box<dyn Fn(&str) -> bool> = if split_paths.iter().all(Option::is_some) {
        let index = match split {
            Split::Train => 0,
            Split::Val => 1,
            Split::Test => 2,
        };
        let path = split_paths.get(index).cloned().flatten().unwrap_or_default();
        let names: HashSet<String> = read_text(&path)?.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        Box::new(move |image: &str| names.contains(image))
    } else {
        // Sorting by name (not file order) keeps the split stable when the caption file is
        // reordered, and using every listed name keeps it stable when images go missing.
        let mut names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        let n = names.len().max(1) as u64;
        let of: HashMap<String, Split> = names.iter().enumerate().map(|(i, name)| (name.to_string(), split_of_bucket(i as u64 * 10 / n))).collect();
        name.push_str(" (no split files: 80/10/10 by sorted image name)");
        Box::new(move |image: &str| of.get(image) == Some(&split))
    };

    let rows =
        entries.into_iter().filter(|(image, _)| wanted(image)).map(|(image, caption)| RawRow { image: image_dir.join(image), caption }).collect();
    Ok(Loaded { name, rows, skipped })
}

/// `IMAGE.jpg#N<TAB>caption`, one per line.
pub(super) fn parse_flickr_token(text: &str, skipped: &mut SkipCounts) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            continue;
        }
        // Some re-distributions replaced the tab with spaces; the `#N` suffix still ends the name.
        let split = line.split_once('\t').or_else(|| {
            line.find('#').and_then(|h| {
                let end = h + line[h..].find(char::is_whitespace)?;
                Some((&line[..end], &line[end..]))
            })
        });
        let Some((key, caption)) = split else {
            skipped.bad_row += 1;
            continue;
        };
        let key = key.trim();
        let image = match key.rsplit_once('#') {
            Some((image, n)) if n.chars().all(|c| c.is_ascii_digit()) => image,
            _ => key,
        };
        if image.is_empty() {
            skipped.bad_row += 1;
            continue;
        }
        entries.push((image.to_string(), caption.to_string()));
    }
    entries
}
