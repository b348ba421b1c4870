//! CSV files of `{image, caption[, split]}` rows.

use super::*;

/// CSV records as the `csv` crate reads them: RFC 4180 quoting (`""` inside quotes is a quote,
/// quoted fields may span lines), a quote inside an unquoted field kept literally (hand-written
/// caption files contain them), blank lines dropped, records of any length (the table decides
/// which to use). A record the reader cannot make is `None`, a bad row.
pub(super) fn parse_csv(text: &str) -> Vec<Option<Vec<String>>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(text.as_bytes());
    reader.records().map(|record| record.ok().map(|r| r.iter().map(str::to_string).collect())).collect()
}

pub(super) struct CsvTable {
    pub(super) records: Vec<Option<Vec<String>>>,
    pub(super) image_col: usize,
    pub(super) caption_col: usize,
    pub(super) split_col: Option<usize>,
    pub(super) width: usize,
}

pub(super) struct CsvRow {
    pub(super) image: String,
    pub(super) caption: String,
    pub(super) split: Option<String>,
}

impl CsvTable {
    pub(super) fn parse(text: &str, path: &Path) -> Result<CsvTable> {
        let shown = path.display().to_string();
        let mut records = parse_csv(text).into_iter();
        let header = match records.next() {
            Some(Some(h)) => h,
            _ => return Err(Error::config(&shown, "empty CSV: expected a header with `image` and `caption` columns")),
        };
        let names: Vec<String> = header.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
        let find = |options: &[&str]| names.iter().position(|n| options.contains(&n.as_str()));
        let image_col = find(&["image", "image_path", "file_name", "filename"]);
        let caption_col = find(&["caption", "text"]);
        let (Some(image_col), Some(caption_col)) = (image_col, caption_col) else {
            return Err(Error::config(&shown, format!("CSV header needs `image` and `caption` columns, found: {}", header.join(", "))));
        };
        Ok(CsvTable { records: records.collect(), image_col, caption_col, split_col: find(&["split"]), width: header.len() })
    }

    pub(super) fn rows<'a>(&'a self, skipped: &'a mut SkipCounts) -> impl Iterator<Item = CsvRow> + 'a {
        self.records.iter().filter_map(move |record| {
            let row = record.as_ref().and_then(|fields| self.row(fields));
            if row.is_none() {
                skipped.bad_row += 1;
            }
            row
        })
    }

    pub(super) fn row(&self, fields: &[String]) -> Option<CsvRow> {
        let caption = if fields.len() > self.width && self.caption_col + 1 == self.width {
            // An unquoted caption with commas (seen in some Kaggle Flickr8k copies) spills into
            // extra fields; when the caption is the last column the spill is unambiguous.
            fields.get(self.caption_col..)?.join(",")
        } else if fields.len() == self.width {
            fields.get(self.caption_col)?.clone()
        } else {
            return None;
        };
        Some(CsvRow { image: fields.get(self.image_col)?.clone(), caption, split: self.split_col.and_then(|c| fields.get(c)).cloned() })
    }
}

pub(super) fn load_csv(path: &Path, image_base: Option<&Path>, split: Split) -> Result<Loaded> {
    let table = CsvTable::parse(&read_text(path)?, path)?;
    let base = image_base.map(Path::to_path_buf).unwrap_or_else(|| parent_dir(path));
    let mut skipped = SkipCounts::default();
    let mut rows = Vec::new();
    let mut hashed = false;
    let mut bad = 0;
    for row in table.rows(&mut skipped) {
        let image = row.image.trim();
        if image.is_empty() {
            bad += 1;
            continue;
        }
        let row_split = match row.split.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) => match Split::from_field(s) {
                Some(sp) => sp,
                None => {
                    bad += 1;
                    continue;
                }
            },
            None => {
                hashed = true;
                hash_split(image)
            }
        };
        if row_split == split {
            rows.push(RawRow { image: base.join(image), caption: row.caption });
        }
    }
    skipped.bad_row += bad;
    Ok(Loaded { name: file_dataset_name("csv", path, hashed), rows, skipped })
}

pub(super) fn file_dataset_name(kind: &str, path: &Path, hashed: bool) -> String {
    let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
    if hashed {
        format!("{kind} {file} ({HASH_SPLIT_NOTE})")
    } else {
        format!("{kind} {file}")
    }
}
