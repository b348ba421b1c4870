//! A model folder's chat template, rendered as transformers' `apply_chat_template` renders it:
//! Jinja (minijinja, with Python's string methods) with `trim_blocks` and `lstrip_blocks`,
//! `raise_exception`, and `messages` in transformers' chat format.

use serde_json::Value;

use crate::error::{Error, Result};

/// Where a folder keeps its template, in the order transformers reads them.
pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
pub const CHAT_TEMPLATE_JSON: &str = "chat_template.json";

/// Template steps one rendering may take: a template that loops without end stops with an error.
const FUEL: u64 = 1_000_000;

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    /// The file it came from (errors name it).
    file: &'static str,
}

impl ChatTemplate {
    /// The template of `chat_template.jinja` (the text itself) or `chat_template.json`
    /// (`{"chat_template": "…"}`); checked for syntax now, so a broken one fails at load.
    pub fn from_file(file: &'static str, bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|e| Error::config(file, format!("not UTF-8: {e}")))?;
        let source = if file.ends_with(".json") {
            let value: Value = serde_json::from_str(text).map_err(|e| Error::config(file, format!("not valid JSON: {e}")))?;
            match value.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                _ => return Err(Error::config(file, "no \"chat_template\" string")),
            }
        } else {
            text.to_string()
        };
        let template = Self { source, file };
        template.environment().template_from_str(&template.source).map_err(|e| template.error(e))?;
        Ok(template)
    }

    fn environment(&self) -> minijinja::Environment<'_> {
        let mut env = minijinja::Environment::new();
        if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build() {
            env.set_syntax(syntax);
        }
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        env
    }

    fn error(&self, e: minijinja::Error) -> Error {
        let mut reason = e.to_string();
        if let Some(detail) = e.detail() {
            if !reason.contains(detail) {
                reason = format!("{reason}: {detail}");
            }
        }
        Error::config(self.file, format!("chat template: {reason}"))
    }

    /// The text of `messages` (transformers' chat format: `[{ role, content: [{ type: "image" },
    /// { type: "text", text }] }]`), with the assistant's turn opened when `add_generation_prompt`.
    pub fn render(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        let env = self.environment();
        let template = env.template_from_str(&self.source).map_err(|e| self.error(e))?;
        let context = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
        };
        template.render(context).map_err(|e| self.error(e))
    }
}

/// One user turn of an image followed by `text` (none: the image alone), as transformers' chat
/// format writes it.
pub fn image_turn(text: Option<&str>) -> Value {
    let mut content = vec![serde_json::json!({ "type": "image" })];
    if let Some(text) = text {
        content.push(serde_json::json!({ "type": "text", "text": text }));
    }
    serde_json::json!([{ "role": "user", "content": content }])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLVLM: &str = "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

    #[test]
    fn renders_as_transformers_does() {
        let t = ChatTemplate::from_file(CHAT_TEMPLATE_JINJA, SMOLVLM.as_bytes()).unwrap();
        let text = t.render(&image_turn(Some("Describe this image.")), true).unwrap();
        assert_eq!(text, "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:");
        assert_eq!(t.render(&image_turn(None), false).unwrap(), "<|im_start|>User:<image><end_of_utterance>\n");
        let json = serde_json::json!({ "chat_template": SMOLVLM }).to_string();
        let t = ChatTemplate::from_file(CHAT_TEMPLATE_JSON, json.as_bytes()).unwrap();
        assert!(t.render(&image_turn(Some("x")), true).unwrap().ends_with("Assistant:"));
    }

    #[test]
    fn python_methods_blocks_and_exceptions() {
        let src = "{% for m in messages %}\n  {{ m['content'][1]['text'].strip().upper() }}\n{% endfor %}{% if messages|length > 1 %}{{ raise_exception('one turn only') }}{% endif %}";
        let t = ChatTemplate::from_file(CHAT_TEMPLATE_JINJA, src.as_bytes()).unwrap();
        // As transformers' Jinja renders it (checked with its _compile_jinja_template).
        assert_eq!(t.render(&image_turn(Some("  hi ")), false).unwrap(), "  HI\n");
        let turn = serde_json::json!({ "role": "user", "content": [{ "type": "image" }, { "type": "text", "text": "a" }] });
        let two = serde_json::json!([turn, turn]);
        let e = t.render(&two, false).unwrap_err().to_string();
        assert!(e.contains("chat_template.jinja") && e.contains("one turn only"), "{e}");
    }

    #[test]
    fn broken_and_endless_templates_are_errors() {
        let e = ChatTemplate::from_file(CHAT_TEMPLATE_JINJA, b"{% for m in messages %}").unwrap_err().to_string();
        assert!(e.contains("chat_template.jinja") && e.contains("chat template"), "{e}");
        let e = ChatTemplate::from_file(CHAT_TEMPLATE_JSON, b"{}").unwrap_err().to_string();
        assert!(e.contains("chat_template.json"), "{e}");
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::from_file(CHAT_TEMPLATE_JINJA, endless.as_bytes()).unwrap();
        assert!(t.render(&image_turn(None), false).is_err());
    }
}
