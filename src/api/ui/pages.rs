//! The dashboard's pages: their table (the navigation) and the HTML frame around each one.
//! The frame is all the server renders; `assets/app.js` fills `<main data-page=…>`.
//!
//! Adding a page: one `Page` entry here, one renderer of the same `name` in
//! the `PAGES` object of `assets/app.js`. The frame, navigation, login and the CSP come free.

use crate::store::keys::Principal;

pub struct Page {
    /// The URL path, under `/ui/`.
    pub path: &'static str,
    /// The renderer's name in `app.js`.
    pub name: &'static str,
    pub title: &'static str,
    /// Only the admin sees it (a tenant session gets a 404 page, as the API answers).
    pub admin: bool,
    /// Listed in the navigation.
    pub nav: bool,
}

pub const PAGES: &[Page] = &[
    Page {
        path: "/ui/",
        name: "live",
        title: "Live calls",
        admin: false,
        nav: true,
    },
    Page {
        path: "/ui/calls",
        name: "history",
        title: "History",
        admin: false,
        nav: true,
    },
    Page {
        path: "/ui/new",
        name: "new_call",
        title: "Test call",
        admin: false,
        nav: true,
    },
    Page {
        path: "/ui/campaigns",
        name: "campaigns",
        title: "Campaigns",
        admin: false,
        nav: true,
    },
    Page {
        path: "/ui/tenants",
        name: "tenants",
        title: "Tenants & keys",
        admin: true,
        nav: true,
    },
    Page {
        path: "/ui/certs",
        name: "certs",
        title: "Certificates",
        admin: true,
        nav: true,
    },
    Page {
        path: "/ui/system",
        name: "system",
        title: "System",
        admin: true,
        nav: true,
    },
];

/// One call's timeline (`/ui/calls/{id}`).
pub const CALL: Page = Page {
    path: "/ui/calls/{id}",
    name: "call",
    title: "Call",
    admin: false,
    nav: false,
};

pub use crate::domain::markup::escape as esc;

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · voicectl</title><link rel=\"stylesheet\" href=\"/ui/assets/app.css\">\
         <link rel=\"icon\" href=\"data:,\"></head>",
        esc(title)
    )
}

/// A page for a logged-in principal. `arg` is the page's argument (a call id); `body`, when
/// not empty, replaces what the script would render (e.g. a 404 text).
pub fn frame(who: &Principal, page: &Page, arg: &str, body: &str) -> String {
    let admin = matches!(who, Principal::Admin { .. });
    let (role, tenant) = match who {
        Principal::Admin { .. } => ("admin", String::new()),
        Principal::Tenant { tenant, .. } => ("tenant", tenant.clone()),
    };
    let mut nav = String::new();
    for p in PAGES.iter().filter(|p| p.nav && (admin || !p.admin)) {
        let current = if p.name == page.name {
            " aria-current=\"page\""
        } else {
            ""
        };
        nav.push_str(&format!(
            "<a href=\"{}\"{current}>{}</a>",
            p.path,
            esc(p.title)
        ));
    }
    let who_label = if admin {
        "admin".to_owned()
    } else {
        format!("tenant {}", esc(&tenant))
    };
    let script = if body.is_empty() {
        "<script type=\"module\" src=\"/ui/assets/app.js\"></script>"
    } else {
        ""
    };
    format!(
        "{head}<body data-role=\"{role}\" data-tenant=\"{tenant}\">\
         <header><a class=\"brand\" href=\"/ui/\">voicectl</a><nav>{nav}</nav>\
         <form class=\"logout\" method=\"post\" action=\"/ui/logout\"><span class=\"who\">{who_label}</span>\
         <button type=\"submit\">Log out</button></form></header>\
         <main id=\"main\" data-page=\"{name}\" data-arg=\"{arg}\"><h1>{title}</h1>{body}</main>{script}</body></html>",
        head = head(page.title),
        tenant = esc(&tenant),
        name = page.name,
        arg = esc(arg),
        title = esc(page.title),
    )
}

/// The login page: with a token from `voicectl open`, a Continue button; otherwise the API-key
/// form. `error` is shown above the form.
pub fn login(token: Option<&str>, error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let form = match token {
        Some(t) => format!(
            "<form method=\"post\" action=\"/ui/login\"><input type=\"hidden\" name=\"token\" value=\"{}\">\
             <p>This one-time link logs this browser in to the dashboard.</p>\
             <button type=\"submit\" id=\"continue\">Continue</button></form>",
            esc(t)
        ),
        None => "<form method=\"post\" action=\"/ui/login\">\
                 <label for=\"api_key\">API key</label>\
                 <input id=\"api_key\" name=\"api_key\" type=\"password\" autocomplete=\"off\" placeholder=\"vk_…\" required>\
                 <button type=\"submit\">Log in</button></form>\
                 <p class=\"hint\">Or run <code>voicectl open</code> (or <code>voicectl open --tenant NAME</code>) \
                 on the server for a one-time login link.</p>"
            .to_owned(),
    };
    format!(
        "{}<body class=\"login\"><main><h1>voicectl</h1>{error}{form}</main></body></html>",
        head("Log in")
    )
}

/// A page that does not exist under `/ui/`.
pub fn not_found() -> String {
    format!(
        "{}<body class=\"login\"><main><h1>Not found</h1><p><a href=\"/ui/\">Back to the dashboard</a></p></main></body></html>",
        head("Not found")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<script>\"x\" & 'y'"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;"
        );
    }
}
