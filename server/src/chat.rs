//! Chats as the text a model continues: with the model's own chat template when its
//! `tokenizer_config.json` has one (Jinja, rendered as Hugging Face's `apply_chat_template` does:
//! `trim_blocks`, `lstrip_blocks`, Python's string methods, `raise_exception`, `strftime_now`),
//! else with troupe's plain one (`Role: text` lines, then `Assistant:`).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::Message;

/// A chat template that cannot be read or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// `tokenizer_config.json` could not be read or is not JSON.
    #[error("{path}: {why}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The template does not parse.
    #[error("the chat template does not parse: {0}")]
    Syntax(String),
    /// Rendering failed (the template raised an exception, or met something it cannot handle).
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// One message as templates read it.
#[derive(Serialize)]
struct TemplateMessage<'a> {
    role: &'a str,
    content: String,
}

/// A special token as `tokenizer_config.json` writes it: a string, or `{"content": ...}`.
fn special(config: &Value, key: &str) -> String {
    match &config[key] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// A template from its Jinja source and the model's BOS and EOS tokens' text.
    pub fn new(source: String, bos: String, eos: String) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        // Transformers renders templates with both on.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<(), Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_function("strftime_now", |format: String| {
            strftime(&format, unix_now())
        });
        env.add_template_owned("chat", source)
            .map_err(|e| ChatTemplateError::Syntax(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// The template in a `tokenizer_config.json`'s text, if it has one (`chat_template` as a
    /// string, or as a list of named templates of which `default` is taken).
    pub fn from_tokenizer_config(json: &str) -> Result<Option<Self>, ChatTemplateError> {
        let config: Value = serde_json::from_str(json).map_err(|e| ChatTemplateError::Config {
            path: "tokenizer_config.json".into(),
            why: e.to_string(),
        })?;
        let source = match &config["chat_template"] {
            Value::String(s) => s.clone(),
            Value::Array(named) => match named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
            {
                Some(s) => s.to_owned(),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        let (bos, eos) = (special(&config, "bos_token"), special(&config, "eos_token"));
        Self::new(source, bos, eos).map(Some)
    }

    /// The template of the model in `dir`: `None` when it has no `tokenizer_config.json` or the
    /// file has no template.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let path = dir.join("tokenizer_config.json");
        match std::fs::read_to_string(&path) {
            Ok(json) => Self::from_tokenizer_config(&json).map_err(|e| match e {
                ChatTemplateError::Config { why, .. } => ChatTemplateError::Config {
                    path: path.display().to_string(),
                    why,
                },
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ChatTemplateError::Config {
                path: path.display().to_string(),
                why: e.to_string(),
            }),
        }
    }

    /// `messages` as the model's text; with `add_generation_prompt`, followed by what opens the
    /// assistant's reply. `continuing` renders the new messages of a session that holds the
    /// conversation before them: without the BOS token, which begins a conversation once.
    pub fn render(
        &self,
        messages: &[(&str, String)],
        add_generation_prompt: bool,
        continuing: bool,
    ) -> Result<String, ChatTemplateError> {
        let messages: Vec<TemplateMessage> = messages
            .iter()
            .map(|(role, content)| TemplateMessage {
                role,
                content: content.clone(),
            })
            .collect();
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        template
            .render(context! {
                messages => minijinja::Value::from(Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => if continuing { "" } else { self.bos.as_str() },
                eos_token => self.eos.as_str(),
            })
            .map_err(|e| ChatTemplateError::Render(e.to_string()))
    }
}

/// The roles a request may give, as templates name them (`developer` is OpenAI's newer name for
/// `system`).
fn role(raw: &str) -> Result<&'static str, ApiError> {
    match raw {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        other => Err(ApiError::bad_request(
            format!("unknown message role `{other}`"),
            Some("messages"),
        )),
    }
}

/// A chat as the text the model continues: the model's template when it has one, else each
/// message on its own lines after its role, then the assistant's turn. (A session continues from
/// what it holds, so a request naming a session sends only its new messages: `continuing`.)
pub fn render_chat(
    template: Option<&ChatTemplate>,
    messages: &[Message],
    add_generation_prompt: bool,
    continuing: bool,
) -> Result<String, ApiError> {
    let messages = messages
        .iter()
        .map(|m| Ok((role(&m.role)?, m.content.text()?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    if let Some(t) = template {
        return t
            .render(&messages, add_generation_prompt, continuing)
            .map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")));
    }
    let mut out = String::new();
    for (role, text) in &messages {
        let role = match *role {
            "system" => "System",
            "user" => "User",
            _ => "Assistant",
        };
        let _ = writeln!(out, "{role}: {text}");
    }
    if add_generation_prompt {
        out.push_str("Assistant:");
    }
    Ok(out)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `secs` since the Unix epoch (UTC) formatted as C's `strftime` does, for the directives chat
/// templates use (`%d %m %Y %y %b %B %a %A %H %M %S %j %%`); others are kept as written.
fn strftime(format: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let before: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = before[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let name = MONTHS[(month - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('d') => write!(out, "{day:02}"),
            Some('m') => write!(out, "{month:02}"),
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('b') => write!(out, "{}", &name[..3]),
            Some('B') => write!(out, "{name}"),
            Some('a') => write!(out, "{}", &weekday[..3]),
            Some('A') => write!(out, "{weekday}"),
            Some('H') => write!(out, "{:02}", of_day / 3600),
            Some('M') => write!(out, "{:02}", of_day / 60 % 60),
            Some('S') => write!(out, "{:02}", of_day % 60),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen3's template, as its tokenizer_config.json ships it (shortened to the parts that do
    /// not concern tools).
    const CHATML: &str = "{%- for message in messages %}\n    {%- if message.content is string %}\n        {%- set content = message.content %}\n    {%- endif %}\n    {{- '<|im_start|>' + message.role + '\\n' + content.strip() + '<|im_end|>' + '\\n' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n";

    #[test]
    fn a_chatml_template_renders_as_transformers_does() {
        let t = ChatTemplate::new(CHATML.into(), String::new(), "<|im_end|>".into()).unwrap();
        let messages = [
            ("system", "Be brief.".to_string()),
            ("user", "  Hi there \n".to_string()),
        ];
        assert_eq!(
            t.render(&messages, true, false).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert!(!t
            .render(&messages, false, false)
            .unwrap()
            .contains("assistant"));
    }

    #[test]
    fn a_config_names_its_template_and_special_tokens_and_errors_are_typed() {
        let config = serde_json::json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.role | upper }}:{{ m.content }}{{ eos_token }}{% endfor %}"},
            ],
        });
        let t = ChatTemplate::from_tokenizer_config(&config.to_string())
            .unwrap()
            .unwrap();
        assert_eq!(
            t.render(&[("user", "hi".into())], true, false).unwrap(),
            "<s>USER:hi</s>"
        );
        assert_eq!(
            t.render(&[("user", "hi".into())], true, true).unwrap(),
            "USER:hi</s>",
            "a session's later turns begin no new conversation"
        );
        assert!(ChatTemplate::from_tokenizer_config("{}").unwrap().is_none());
        assert!(matches!(
            ChatTemplate::from_tokenizer_config("{"),
            Err(ChatTemplateError::Config { .. })
        ));
        assert!(matches!(
            ChatTemplate::new("{% for %}".into(), String::new(), String::new()),
            Err(ChatTemplateError::Syntax(_))
        ));
        let raising = ChatTemplate::new(
            "{{ raise_exception('only user and assistant roles') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        match raising.render(&[("user", "x".into())], true, false) {
            Err(ChatTemplateError::Render(why)) => assert!(why.contains("only user")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn strftime_formats_dates_as_c_does() {
        // 2024-02-29 13:05:09 UTC, a Thursday, the 60th day of a leap year.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%d %b %Y %H:%M:%S %a %j %B %m/%y %%", t),
            "29 Feb 2024 13:05:09 Thu 060 February 02/24 %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
    }
}
