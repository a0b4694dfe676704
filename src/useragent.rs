//! User-agent classification for clicks: device, browser, OS and bot flag.
//! `woothee` parses the browser and OS; `isbot` (plus a few link-preview and
//! scanner patterns it lacks) decides what is a bot. Results are memoised per
//! backend because redirect traffic repeats the same few user agents.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::LazyLock;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAgentInfo {
    /// mobile, tablet, desktop, bot or unknown
    pub device: &'static str,
    pub browser: Option<String>,
    pub os: Option<String>,
    pub is_bot: bool,
}

/// Link-preview fetchers, mail scanners and HTTP libraries missing from isbot's list.
const EXTRA_BOT_PATTERNS: [&str; 16] = [
    r"whatsapp/",
    r"linkedinbot",
    r"google-inspectiontool",
    r"iframely",
    r"vkshare",
    r"proofpoint",
    r"mimecast",
    r"barracuda",
    r"go-http-client",
    r"node-fetch",
    r"axios/",
    r"wget",
    r"httpie",
    r"libwww-perl",
    r"^java/",
    r"okhttp/.*(bot|crawl)",
];

static BOTS: LazyLock<isbot::Bots> = LazyLock::new(|| {
    let mut bots = isbot::Bots::default();
    bots.append(&EXTRA_BOT_PATTERNS);
    bots
});
static PARSER: LazyLock<woothee::parser::Parser> = LazyLock::new(woothee::parser::Parser::new);

const MEMO_CAPACITY: usize = 2048;
thread_local! {
    static MEMO: RefCell<HashMap<String, UserAgentInfo>> = RefCell::new(HashMap::new());
}

/// Classifies a user agent; an empty or missing one is a bot (real browsers always send one).
pub fn classify(user_agent: Option<&str>) -> UserAgentInfo {
    let ua = user_agent.map(str::trim).unwrap_or("");
    if ua.is_empty() {
        return UserAgentInfo {
            device: "bot",
            browser: None,
            os: None,
            is_bot: true,
        };
    }
    if let Some(hit) = MEMO.with(|m| m.borrow().get(ua).cloned()) {
        return hit;
    }
    let info = classify_uncached(ua);
    MEMO.with(|m| {
        let mut m = m.borrow_mut();
        if m.len() >= MEMO_CAPACITY {
            m.clear();
        }
        m.insert(ua.to_string(), info.clone());
    });
    info
}

fn classify_uncached(ua: &str) -> UserAgentInfo {
    let parsed = PARSER.parse(ua);
    let category = parsed.as_ref().map_or("UNKNOWN", |p| p.category);
    let is_bot = category == "crawler" || BOTS.is_bot(ua);
    let known = |s: &str| (!s.is_empty() && s != "UNKNOWN").then(|| s.to_string());
    let browser = parsed
        .as_ref()
        .and_then(|p| known(p.name))
        .filter(|_| category != "crawler");
    let os = parsed
        .as_ref()
        .and_then(|p| known(p.os))
        .map(|os| normalize_os(&os));
    let device = if is_bot {
        "bot"
    } else {
        match category {
            "smartphone" | "mobilephone" if is_tablet(ua) => "tablet",
            "smartphone" | "mobilephone" => "mobile",
            "pc" if is_tablet(ua) => "tablet",
            "pc" => "desktop",
            _ => "unknown",
        }
    };
    UserAgentInfo {
        device,
        browser,
        os,
        is_bot,
    }
}

fn is_tablet(ua: &str) -> bool {
    ua.contains("iPad")
        || ua.contains("Tablet")
        || (ua.contains("Android") && !ua.contains("Mobile"))
}

fn normalize_os(os: &str) -> String {
    match os {
        "iPhone" | "iPad" | "iPod" => "iOS".into(),
        "Mac OSX" => "macOS".into(),
        s if s.starts_with("Windows") => "Windows".into(),
        s => s.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(ua: &str, device: &str, browser: Option<&str>, os: Option<&str>, bot: bool) {
        let info = classify(Some(ua));
        assert_eq!(info.device, device, "device of {ua}");
        assert_eq!(info.is_bot, bot, "is_bot of {ua}");
        if browser.is_some() {
            assert_eq!(info.browser.as_deref(), browser, "browser of {ua}");
        }
        if os.is_some() {
            assert_eq!(info.os.as_deref(), os, "os of {ua}");
        }
    }

    #[test]
    fn real_browsers() {
        check(
            "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1",
            "mobile",
            Some("Safari"),
            Some("iOS"),
            false,
        );
        check(
            "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/16.6 Mobile/15E148 Safari/604.1",
            "tablet",
            Some("Safari"),
            Some("iOS"),
            false,
        );
        check(
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.6099.144 Mobile Safari/537.36",
            "mobile",
            Some("Chrome"),
            Some("Android"),
            false,
        );
        check(
            "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            "tablet",
            Some("Chrome"),
            Some("Android"),
            false,
        );
        check(
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36",
            "desktop",
            Some("Chrome"),
            Some("Windows"),
            false,
        );
        check(
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.1 Safari/605.1.15",
            "desktop",
            Some("Safari"),
            Some("macOS"),
            false,
        );
        check(
            "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0",
            "desktop",
            Some("Firefox"),
            Some("Linux"),
            false,
        );
    }

    #[test]
    fn crawlers_previews_and_scanners_are_bots() {
        for ua in [
            "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
            "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
            "Twitterbot/1.0",
            "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
            "Mozilla/5.0 (compatible; Discordbot/2.0; +https://discordapp.com)",
            "TelegramBot (like TwitterBot)",
            "WhatsApp/2.23.20.0",
            "LinkedInBot/1.0 (compatible; Mozilla/5.0; Apache-HttpClient +http://www.linkedin.com)",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/120.0.0.0 Safari/537.36",
            "curl/8.4.0",
            "python-requests/2.31.0",
            "Go-http-client/1.1",
            "Wget/1.21.4",
        ] {
            let info = classify(Some(ua));
            assert!(info.is_bot, "{ua} is a bot");
            assert_eq!(info.device, "bot", "{ua}");
        }
    }

    #[test]
    fn empty_user_agent_is_a_bot() {
        assert!(classify(None).is_bot);
        assert!(classify(Some("  ")).is_bot);
        assert_eq!(classify(Some("")).device, "bot");
    }

    #[test]
    fn gibberish_is_unknown_not_bot() {
        let info = classify(Some("SomethingOdd 1.0"));
        assert_eq!(info.device, "unknown");
        assert!(!info.is_bot);
    }

    #[test]
    fn memo_returns_the_same_answer() {
        let ua = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";
        assert_eq!(classify(Some(ua)), classify(Some(ua)));
    }
}
