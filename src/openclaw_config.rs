//! `synthesis openclaw-config`: the provider block to merge into `openclaw.json`.
//!
//! OpenClaw requires an `apiKey` string for an `openai-completions` provider and sends it as the
//! bearer token. With `api_key` set, that is it; without, synthesis checks no key, and the block
//! says so with a placeholder (`NO_API_KEY`) rather than a value that looks like a secret.

use serde_json::{json, Value};

use crate::config::Config;

/// The `apiKey` written when synthesis has no `api_key`: any value would be accepted.
pub const NO_API_KEY: &str = "no-api-key-configured";

/// What to tell the operator next to the JSON (on stderr), if anything.
pub fn note(c: &Config) -> Option<String> {
    c.api_key.is_none().then(|| {
        format!(
            "note: no api_key is set, so synthesis accepts any key and the provider's apiKey is the placeholder \
             {NO_API_KEY:?}. Before exposing synthesis beyond this host, set api_key (or SYNTHESIS_API_KEY) and \
             run this again."
        )
    })
}

/// `base_url`: where OpenClaw reaches synthesis when that is not `listen` (a load balancer in
/// front of several hosts); by default `http://<listen>/v1`.
pub fn provider_json(c: &Config, base_url: Option<&str>) -> Value {
    let mut addr = c.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let base_url = base_url.map_or_else(|| format!("http://{addr}/v1"), String::from);
    json!({
        "models": {"mode": "merge", "providers": {"synthesis-claude-bridge": {
            "baseUrl": base_url,
            "apiKey": c.api_key.as_deref().unwrap_or(NO_API_KEY),
            "api": "openai-completions",
            "timeoutSeconds": 3600,
            "models": [{
                "id": c.model, "name": "Claude Code (synthesis)", "reasoning": false,
                // Images arrive as data: URLs and reach Claude as files it reads.
                "input": ["text", "image"],
                "cost": {"input": 0, "output": 0, "cacheRead": 0, "cacheWrite": 0},
                "contextWindow": 200000, "maxTokens": 32000,
                // Without these OpenClaw sends nothing that identifies the session.
                "compat": {"sendSessionAffinityHeaders": true, "supportsPromptCacheKey": true}
            }]
        }}},
        "agents": {"defaults": {"model": {"primary": format!("synthesis-claude-bridge/{}", c.model)}}}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balancer_address_replaces_listen() {
        let c = Config::parse("listen = 127.0.0.1:9000", |_| None).unwrap();
        let j = provider_json(&c, Some("http://lb.internal:8787/v1"));
        assert_eq!(j["models"]["providers"]["synthesis-claude-bridge"]["baseUrl"], "http://lb.internal:8787/v1");
    }

    #[test]
    fn fills_in_listen_key_and_model() {
        let c = Config::parse("listen = 0.0.0.0:9000\napi_key = sekrit\nmodel = cc", |_| None).unwrap();
        let j = provider_json(&c, None);
        let p = &j["models"]["providers"]["synthesis-claude-bridge"];
        assert_eq!(p["baseUrl"], "http://127.0.0.1:9000/v1");
        assert_eq!(p["apiKey"], "sekrit");
        assert_eq!(p["models"][0]["id"], "cc");
        assert_eq!(p["models"][0]["compat"]["sendSessionAffinityHeaders"], true);
        assert_eq!(p["models"][0]["input"], json!(["text", "image"]), "else OpenClaw sends images elsewhere");
        assert_eq!(j["agents"]["defaults"]["model"]["primary"], "synthesis-claude-bridge/cc");
        assert_eq!(note(&c), None);
    }

    #[test]
    fn without_api_key_the_placeholder_says_so() {
        let c = Config::parse("", |_| None).unwrap();
        assert_eq!(provider_json(&c, None)["models"]["providers"]["synthesis-claude-bridge"]["apiKey"], NO_API_KEY);
        assert!(note(&c).unwrap().contains("accepts any key"));
    }
}
