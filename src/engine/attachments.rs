//! Images and files in OpenAI content parts. `image_url` parts with `data:` URLs and `file`
//! parts (`file_data` + `filename`) are decoded here and become files under the state dir that
//! the channel message names, so Claude can open them with its Read tool. The engine only
//! decides names and bytes: the shell writes them (`Output::WriteAttachment`) right before the
//! message that names them is delivered.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::history::stable_hash;
use crate::wire::base64;
use crate::wire::openai::ApiError;

/// Largest single image or file, decoded.
pub const ATTACHMENT_MAX: usize = 10 * 1024 * 1024;
/// Largest total of the attachments one request hands to Claude.
pub const REQUEST_ATTACHMENTS_MAX: usize = 32 * 1024 * 1024;

/// A file to write before delivering the message that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub path: String,
    #[serde(with = "crate::wire::base64::serde_bytes")]
    pub bytes: Vec<u8>,
}

/// The directory of one session's attachments: `<attachments_dir>/<hash of the session key>`
/// (a key is client text; it never becomes a path itself).
pub fn session_dir(attachments_dir: &str, key: &str) -> String {
    format!("{}/{:016x}", attachments_dir.trim_end_matches('/'), stable_hash(key.as_bytes()))
}

/// How content parts that are not text are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Decode and keep them as files; a bad or oversized part refuses the request.
    Strict,
    /// Decode and keep them as files; a bad or oversized part becomes a note in the text.
    Lenient,
    /// Only mention them (earlier history handed to a new Claude session).
    Mention,
}

/// Renders content into the text Claude reads, collecting the files it names.
pub struct Renderer {
    dir: String,
    /// Bytes still allowed for this request.
    budget: usize,
    pub files: Vec<Attachment>,
}

impl Renderer {
    pub fn new(dir: String) -> Self {
        Renderer { dir, budget: REQUEST_ATTACHMENTS_MAX, files: Vec::new() }
    }

    /// The text of a message's content: a string, or its parts in order (text parts as they
    /// are, attachments as a line naming the file), joined by newlines.
    pub fn content(&mut self, content: Option<&Value>, mode: Mode) -> Result<String, ApiError> {
        match content {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Array(parts)) => {
                let mut out = Vec::new();
                for p in parts {
                    if let Some(t) = self.part(p, mode)? {
                        out.push(t);
                    }
                }
                Ok(out.join("\n"))
            }
            _ => Ok(String::new()),
        }
    }

    /// One content part; `None` for parts that carry nothing for Claude.
    pub fn part(&mut self, part: &Value, mode: Mode) -> Result<Option<String>, ApiError> {
        if let Some(text) = part.get("text").and_then(Value::as_str) {
            return Ok(Some(text.to_string()));
        }
        let kind = part.get("type").and_then(Value::as_str).unwrap_or("");
        let result = match kind {
            "image_url" | "input_image" => self.image(part, mode),
            "file" | "input_file" => self.file(part, mode),
            "input_audio" => Ok("[audio attachment: not supported, left out]".to_string()),
            _ => return Ok(None),
        };
        match result {
            Ok(text) => Ok(Some(text)),
            Err(e) if mode == Mode::Strict => Err(e),
            Err(e) => Ok(Some(format!("[attachment left out: {}]", e.message))),
        }
    }

    fn image(&mut self, part: &Value, mode: Mode) -> Result<String, ApiError> {
        let url = match part.get("image_url") {
            Some(Value::String(u)) => u.as_str(),
            Some(v) => v.get("url").and_then(Value::as_str).unwrap_or(""),
            None => "",
        };
        if url.starts_with("http://") || url.starts_with("https://") {
            return Ok(format!("[image: {url}]"));
        }
        if mode == Mode::Mention {
            return Ok("[image]".into());
        }
        let Some(data_url) = url.strip_prefix("data:") else {
            return Err(invalid("an image_url part needs a data: URL or an http(s) URL"));
        };
        let (mime, bytes) = self.decode(data_url, "image")?;
        let ext = match mime.as_str() {
            "image/png" => "png",
            "image/jpeg" | "image/jpg" => "jpg",
            "image/gif" => "gif",
            "image/webp" => "webp",
            other => {
                return Err(invalid(&format!("image type {other:?} is not supported: send PNG, JPEG, GIF or WebP")))
            }
        };
        let path = self.keep(bytes, &format!("image.{ext}"));
        Ok(format!("[image attached: {path} — open it with the Read tool]"))
    }

    fn file(&mut self, part: &Value, mode: Mode) -> Result<String, ApiError> {
        let file = part.get("file").unwrap_or(part);
        let name = file.get("filename").and_then(Value::as_str).unwrap_or("file");
        if mode == Mode::Mention {
            return Ok(format!("[file: {name}]"));
        }
        let Some(data) = file.get("file_data").and_then(Value::as_str) else {
            let id = file.get("file_id").and_then(Value::as_str).unwrap_or("?");
            return Err(invalid(&format!("file {name:?} ({id}) has no file_data: only inline files reach Claude")));
        };
        let bytes = match data.strip_prefix("data:") {
            Some(data_url) => self.decode(data_url, "file")?.1,
            None => self.decode_base64(data, "file")?,
        };
        let path = self.keep(bytes, name);
        Ok(format!("[file attached: {name} at {path} — open it with the Read tool]"))
    }

    /// A `data:` URL (without its scheme): media type and bytes.
    fn decode(&mut self, data_url: &str, what: &str) -> Result<(String, Vec<u8>), ApiError> {
        let (meta, data) =
            data_url.split_once(',').ok_or_else(|| invalid(&format!("the {what}'s data: URL has no comma")))?;
        let mut params = meta.split(';');
        let mime = params.next().unwrap_or("").trim().to_ascii_lowercase();
        let bytes = if params.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
            self.decode_base64(data, what)?
        } else {
            self.charge(data.len())?;
            percent_decode(data)
        };
        Ok((if mime.is_empty() { "text/plain".into() } else { mime }, bytes))
    }

    fn decode_base64(&mut self, data: &str, what: &str) -> Result<Vec<u8>, ApiError> {
        self.charge(base64::decoded_len(data))?;
        base64::decode(data).map_err(|e| invalid(&format!("the {what} is not valid base64: {e}")))
    }

    /// Count `len` bytes against the per-attachment and per-request limits.
    fn charge(&mut self, len: usize) -> Result<(), ApiError> {
        if len > ATTACHMENT_MAX {
            let msg = format!("an attachment of {len} bytes is over the limit of {ATTACHMENT_MAX} bytes");
            return Err(ApiError::new(413, "attachment_too_large", msg));
        }
        if len > self.budget {
            let msg = format!("the attachments of this request are over the limit of {REQUEST_ATTACHMENTS_MAX} bytes");
            return Err(ApiError::new(413, "attachment_too_large", msg));
        }
        self.budget -= len;
        Ok(())
    }

    /// Keep `bytes` as a file named after its content (the same image resent is the same file).
    fn keep(&mut self, bytes: Vec<u8>, name: &str) -> String {
        let path = format!("{}/{:016x}-{}", self.dir, stable_hash(&bytes), safe_name(name));
        if !self.files.iter().any(|f| f.path == path) {
            self.files.push(Attachment { path: path.clone(), bytes });
        }
        path
    }
}

fn invalid(msg: &str) -> ApiError {
    ApiError::new(400, "invalid_attachment", msg)
}

/// A file name that is safe as the last component of a path: letters, digits, `.`, `-`, `_`.
fn safe_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String =
        base.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') { c } else { '_' }).collect();
    let clean = clean.trim_start_matches('.');
    let clean: String = clean.chars().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
    if clean.is_empty() {
        "file".into()
    } else {
        clean
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn png_part(b64: &str) -> Value {
        json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{b64}")}})
    }

    #[test]
    fn images_and_files_become_named_files_in_order_with_the_text() {
        let mut r = Renderer::new("/s/attachments/k".into());
        let content = json!([
            {"type": "text", "text": "look"},
            png_part("iVBORw0K"),
            {"type": "file", "file": {"filename": "../../etc/notes v1.txt", "file_data": "data:text/plain;base64,aGk="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        ]);
        let text = r.content(Some(&content), Mode::Strict).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "look");
        let png = &r.files[0];
        assert!(png.path.starts_with("/s/attachments/k/") && png.path.ends_with("-image.png"), "{}", png.path);
        assert_eq!(png.bytes, base64::decode("iVBORw0K").unwrap());
        assert_eq!(lines[1], format!("[image attached: {} — open it with the Read tool]", png.path));
        assert!(r.files[1].path.ends_with("-notes_v1.txt"), "no path escapes the directory: {}", r.files[1].path);
        assert_eq!(r.files[1].bytes, b"hi");
        assert!(lines[2].starts_with("[file attached: ../../etc/notes v1.txt at /s/attachments/k/"));
        assert_eq!(lines[3], "[image: https://example.com/a.png]");
    }

    #[test]
    fn the_same_image_twice_is_one_file() {
        let mut r = Renderer::new("/d".into());
        r.content(Some(&json!([png_part("AAAA"), png_part("AAAA")])), Mode::Strict).unwrap();
        assert_eq!(r.files.len(), 1);
    }

    #[test]
    fn bad_and_oversized_parts_refuse_strictly_and_become_notes_leniently() {
        let mut r = Renderer::new("/d".into());
        let bad = json!([png_part("!!!")]);
        assert_eq!(r.content(Some(&bad), Mode::Strict).unwrap_err().code, "invalid_attachment");
        let note = r.content(Some(&bad), Mode::Lenient).unwrap();
        assert!(note.starts_with("[attachment left out: the image is not valid base64"), "{note}");
        let huge = json!([png_part(&"A".repeat(ATTACHMENT_MAX / 3 * 4 + 8))]);
        let e = r.content(Some(&huge), Mode::Strict).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (413, "attachment_too_large"));
        let tiff = json!([{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]);
        assert_eq!(r.content(Some(&tiff), Mode::Strict).unwrap_err().status, 400);
        assert!(r.files.is_empty());
    }

    #[test]
    fn the_request_budget_is_shared_by_its_attachments() {
        let mut r = Renderer::new("/d".into());
        let chunk = "A".repeat(ATTACHMENT_MAX / 10 * 9 / 3 * 4);
        let parts: Vec<Value> = (0..4).map(|_| png_part(&chunk)).collect();
        let e = r.content(Some(&Value::Array(parts)), Mode::Strict).unwrap_err();
        assert_eq!(e.status, 413);
        assert!(e.message.contains("attachments of this request"), "{}", e.message);
    }

    #[test]
    fn mentions_need_no_decoding() {
        let mut r = Renderer::new("/d".into());
        let text = r.content(Some(&json!([png_part("!!!")])), Mode::Mention).unwrap();
        assert_eq!(text, "[image]");
        assert!(r.files.is_empty());
    }

    #[test]
    fn plain_data_urls_are_percent_decoded() {
        assert_eq!(percent_decode("a%20b%2"), b"a b%2");
    }
}
