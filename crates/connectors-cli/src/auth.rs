//! `connectors auth <vendor>`: the OAuth2 authorization-code flow. Prints the vendor's
//! authorization URL, receives the redirect on a one-shot local listener, exchanges the code and
//! stores the tokens through the configured credential provider.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use clap::Args;
use clap::builder::PossibleValuesParser;
use connector_core::http::Url;
use connector_core::oauth::{self, AuthorizationRequest, OAuthProvider, TokenSet};
use connector_core::{CredentialProvider, EnvCredentialProvider, ExposeSecret, SecretString};
use tokio::sync::oneshot;

use crate::CliError;
use crate::commands::load_or_defaults;

/// The vendors `connectors auth` knows (`OAuthProvider::id`).
const VENDORS: [&str; 4] = ["gdrive", "quickbooks", "gusto", "xero"];

#[derive(Debug, Args)]
pub struct AuthArgs {
    /// The vendor to authorize.
    #[arg(value_name = "VENDOR", value_parser = PossibleValuesParser::new(VENDORS))]
    vendor: String,
    /// Where the vendor sends the browser back; must be a redirect URI registered for the app.
    #[arg(long, value_name = "URI", default_value = "http://localhost:8080/oauth/callback")]
    redirect_uri: String,
    /// Address the local listener binds (default: the redirect URI's host and port).
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<String>,
    /// Scopes to ask for instead of the vendor's defaults (comma- or space-separated; repeatable).
    #[arg(long, value_name = "SCOPES", value_delimiter = ',')]
    scopes: Vec<String>,
    /// Seconds to wait for the redirect.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// When the configured credentials cannot store tokens (environment variables only), print
    /// `export ARAGORA_...=` lines with the tokens instead of refusing.
    #[arg(long)]
    print_tokens: bool,
    /// The vendor's authorization endpoint, for tests and sandboxes.
    #[arg(long, value_name = "URL", env = "ARAGORA_OAUTH_AUTH_URL", hide = true)]
    auth_url: Option<String>,
    /// The vendor's token endpoint, for tests and sandboxes.
    #[arg(long, value_name = "URL", env = "ARAGORA_OAUTH_TOKEN_URL", hide = true)]
    token_url: Option<String>,
}

/// A core error as a CLI error, without more context: configuration problems exit 2.
fn core_error(e: connector_core::Error) -> CliError {
    if e.kind() == connector_core::ErrorKind::Config {
        CliError::usage(e.to_string())
    } else {
        CliError::failed(e.to_string())
    }
}

pub async fn auth(path: &Path, args: AuthArgs) -> Result<u8, CliError> {
    let mut provider = OAuthProvider::by_id(&args.vendor).ok_or_else(|| {
        CliError::usage(format!("unknown vendor {:?}; one of {}", args.vendor, VENDORS.join(", ")))
    })?;
    let auth_url = args.auth_url.filter(|u| !u.is_empty());
    let token_url = args.token_url.filter(|u| !u.is_empty());
    if auth_url.is_some() || token_url.is_some() {
        let auth_url = auth_url.unwrap_or_else(|| provider.auth_url.to_string());
        let token_url = token_url.unwrap_or_else(|| provider.token_url.to_string());
        provider = provider.with_endpoints(auth_url, token_url);
    }
    let (name, id) = (provider.name, provider.id);
    if args.timeout == 0 {
        return Err(CliError::usage("--timeout: must be at least 1 second"));
    }
    let timeout = Duration::from_secs(args.timeout);
    let redirect_uri = args.redirect_uri.clone();
    let redirect = Url::parse(&redirect_uri)
        .map_err(|e| CliError::usage(format!("--redirect-uri: {redirect_uri:?} is not a URL: {e}")))?;
    let listen = match args.listen {
        Some(listen) => listen,
        None => {
            if redirect.scheme() != "http" {
                return Err(CliError::usage(format!(
                    "--redirect-uri: {redirect_uri} is not http://: the local listener speaks plain HTTP; \
                     pass --listen HOST:PORT when a proxy forwards the redirect to it"
                )));
            }
            let host = redirect
                .host_str()
                .ok_or_else(|| CliError::usage(format!("--redirect-uri: {redirect_uri} has no host")))?;
            format!("{host}:{}", redirect.port_or_known_default().unwrap_or(80))
        }
    };
    let scopes: Vec<&str> = args.scopes.iter().flat_map(|s| s.split_whitespace()).collect();

    let loaded = load_or_defaults(path)?;
    let credentials = &loaded.credentials;
    let store = match (&credentials.writer, args.print_tokens) {
        (Some(_), _) => Some(credentials.provider.clone()),
        (None, true) => None,
        (None, false) => {
            let file = if path.exists() {
                path.display().to_string()
            } else {
                format!("{} (not found; defaults apply)", path.display())
            };
            return Err(CliError::usage(format!(
                "{file}: the configured credentials ({}) cannot store the {name} tokens: environment \
                 variables are read, not written. Configure a provider that stores them, such as \
                 [credentials] providers = [\"vault\", \"env\"] with a [credentials.vault] table (see \
                 docs/credentials.md), or pass --print-tokens to print `export ARAGORA_...=` lines \
                 for your shell instead",
                credentials.provider.describe()
            )));
        }
    };
    let keys = provider.keys();
    let client_id = read_client(&*credentials.provider, &keys.client_id, name, "id").await?;
    let client_secret = read_client(&*credentials.provider, &keys.client_secret, name, "secret").await?;
    let request = oauth::get_oauth_url(&provider, client_id.expose_secret(), &redirect_uri, &scopes)
        .map_err(core_error)?;

    let listener = tokio::net::TcpListener::bind(listen.as_str()).await.map_err(|e| {
        CliError::failed(format!(
            "cannot listen on {listen} for the redirect to {redirect_uri}: {e} (free the port, or \
             pass another --redirect-uri registered for the {name} app, or --listen)"
        ))
    })?;
    let local = listener.local_addr().map_or_else(|_| listen.clone(), |a| a.to_string());

    let url = request.url.to_string();
    let (done_tx, done_rx) = oneshot::channel();
    let flow = Flow {
        provider: provider.clone(),
        request,
        client_id: client_id.expose_secret().to_owned(),
        client_secret,
        redirect_uri: redirect_uri.clone(),
        store,
    };
    let shared =
        Arc::new(Shared { path: redirect.path().to_owned(), flow: Mutex::new(Some((flow, done_tx))) });
    let app = Router::new().fallback(callback).with_state(shared.clone());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });

    eprintln!("Open this URL in a browser and authorize {name}:");
    println!("{url}");
    eprintln!(
        "Waiting up to {} s for the redirect to {redirect_uri} (listening on {local})...",
        args.timeout
    );

    // Once the redirect has arrived, its exchange and writes run to the end, whatever the timeout.
    let arrived = || shared.flow.lock().expect("poisoned").is_none();
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline, done_rx);
    let mut waiting_for_redirect = true;
    let outcome = loop {
        tokio::select! {
            received = &mut done_rx => break received.unwrap_or_else(|_| {
                Err(CliError::failed("the redirect could not be handled; nothing was stored"))
            }),
            () = &mut deadline, if waiting_for_redirect => {
                waiting_for_redirect = false;
                if !arrived() {
                    break Err(CliError::failed(format!(
                        "no redirect arrived at {redirect_uri} within {} s; nothing was stored. Check \
                         that it is a redirect URI registered for the {name} app, then run \
                         `connectors auth {id}` again (--timeout to wait longer)",
                        args.timeout
                    )));
                }
            }
            _ = tokio::signal::ctrl_c() => break Err(CliError::failed(if arrived() {
                "interrupted while the redirect was handled: the tokens may be stored only in part; \
                 run the authorization again"
            } else {
                "interrupted; nothing was stored"
            })),
        }
    };
    // Let the browser get its page, then stop listening.
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    let received = outcome?;

    let tokens = &received.tokens;
    let mut written: Vec<(&str, SecretString)> = Vec::new();
    match &tokens.refresh_token {
        Some(refresh) => written.push((&keys.refresh_token, refresh.clone())),
        None => eprintln!(
            "warning: {name} returned no refresh token: syncs work only until the access token \
             expires ({}). Revoke the app's access at {name} and run `connectors auth {id}` again",
            tokens.expires_at.map_or_else(|| "expiry unknown".to_owned(), |at| at.to_rfc3339())
        ),
    }
    written.push((&keys.access_token, tokens.access_token.clone()));
    let expiry = tokens
        .expires_at
        .map_or_else(|| "unknown".to_owned(), |at| at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    written.push((&keys.token_expires_at, SecretString::from(expiry)));

    match (&credentials.writer, received.stored) {
        (Some(writer), true) => {
            println!("Stored the {name} tokens:");
            for (key, _) in &written {
                println!("  {key}: {}", writer.location_of(key));
            }
            for earlier in &credentials.before_writer {
                for (key, _) in &written {
                    if let Ok(Some(_)) = earlier.get_credential(key).await {
                        eprintln!(
                            "warning: {key} is also set in {}, which is read first: remove it there, \
                             or the stored value is not used",
                            earlier.location_of(key)
                        );
                    }
                }
            }
            if args.print_tokens {
                eprintln!(
                    "note: --print-tokens is ignored: the tokens were stored, and are never printed then"
                );
            }
        }
        _ => {
            eprintln!(
                "The configured credentials ({}) cannot store tokens; here they are as shell \
                 variables. They are secrets: keep them out of logs and shell history.",
                credentials.provider.describe()
            );
            let env = EnvCredentialProvider::new();
            for (key, value) in &written {
                println!("export {}={}", env.variable(key), shell_quote(value.expose_secret()));
            }
            if provider.rotates_refresh_token {
                eprintln!(
                    "warning: {name} replaces the refresh token at every refresh, and a token read \
                     from the environment cannot be replaced there: after a restart the exported \
                     one may no longer work. Use a provider that stores tokens (\"vault\") for \
                     unattended syncs"
                );
            }
        }
    }
    if let Some(realm) = &received.realm_id {
        println!("{name} company ID (realmId): {realm}");
    }
    Ok(0)
}

/// Reads the app's client id or secret; missing is a configuration error.
async fn read_client(
    credentials: &dyn CredentialProvider,
    key: &str,
    name: &str,
    what: &str,
) -> Result<SecretString, CliError> {
    match credentials.get_credential(key).await {
        Ok(Some(value)) if !value.expose_secret().is_empty() => Ok(value),
        Ok(_) => Err(CliError::usage(format!(
            "missing credential `{key}` (the {name} app's client {what}): set {}",
            credentials.location_of(key)
        ))),
        Err(e) => Err(core_error(e.context(format!("reading `{key}`")))),
    }
}

/// `'value'` for a POSIX shell.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// What the listener shares with its handler.
struct Shared {
    /// The redirect URI's path; other paths are 404.
    path: String,
    /// Taken by the first redirect (the listener is one-shot), with where its outcome goes.
    flow: Mutex<Option<(Flow, Done)>>,
}

struct Flow {
    provider: OAuthProvider,
    request: AuthorizationRequest,
    client_id: String,
    client_secret: SecretString,
    redirect_uri: String,
    /// Where the tokens go; `None`: they are printed.
    store: Option<Arc<dyn CredentialProvider>>,
}

/// Where the outcome of the redirect goes.
type Done = oneshot::Sender<Result<Received, CliError>>;

struct Received {
    tokens: TokenSet,
    stored: bool,
    /// QuickBooks' company ID from the redirect.
    realm_id: Option<String>,
}

/// The page the browser gets.
struct Page {
    status: StatusCode,
    title: &'static str,
    body: String,
}

impl Page {
    fn new(status: StatusCode, title: &'static str, body: impl Into<String>) -> Self {
        Self { status, title, body: body.into() }
    }
}

impl IntoResponse for Page {
    fn into_response(self) -> Response {
        let html = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{title}</title></head>\
             <body style=\"font-family: sans-serif; margin: 3em\"><h1>{title}</h1><p>{body}</p></body></html>\n",
            title = html_escape(self.title),
            body = html_escape(&self.body)
        );
        let headers = [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (header::REFERRER_POLICY, "no-referrer"),
        ];
        (self.status, headers, html).into_response()
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Text from the redirect, safe to print on a terminal: no control characters, 300 at most.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(300).collect()
}

async fn callback(State(shared): State<Arc<Shared>>, uri: Uri) -> Response {
    if uri.path() != shared.path {
        return Page::new(
            StatusCode::NOT_FOUND,
            "Not found",
            "This server only receives the OAuth2 redirect.",
        )
        .into_response();
    }
    let params: HashMap<String, String> = Url::parse(&format!("http://localhost{uri}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default();
    if !["code", "state", "error"].iter().any(|k| params.contains_key(*k)) {
        return Page::new(
            StatusCode::BAD_REQUEST,
            "Waiting for the authorization",
            "This address receives the redirect after you authorize: open the URL printed in the terminal.",
        )
        .into_response();
    }
    let Some((flow, done)) = shared.flow.lock().expect("poisoned").take() else {
        return Page::new(
            StatusCode::CONFLICT,
            "Already handled",
            "The redirect was already received; see the terminal.",
        )
        .into_response();
    };
    // In its own task: a browser that goes away does not interrupt storing the tokens.
    match tokio::spawn(finish(flow, params, done)).await {
        Ok(page) => page.into_response(),
        Err(_) => Page::new(StatusCode::INTERNAL_SERVER_ERROR, "Authorization failed", "See the terminal.")
            .into_response(),
    }
}

/// Handles the redirect and sends the outcome to the command; returns the browser's page.
async fn finish(flow: Flow, params: HashMap<String, String>, done: Done) -> Page {
    let (page, outcome) = match receive(&flow, &params).await {
        Ok(received) => {
            let page = Page::new(
                StatusCode::OK,
                "Authorization complete",
                format!(
                    "{} is authorized. You can close this tab and return to the terminal.",
                    flow.provider.name
                ),
            );
            (page, Ok(received))
        }
        Err((page, error)) => (page, Err(error)),
    };
    let _ = done.send(outcome);
    page
}

/// Checks the redirect, exchanges the code and stores the tokens.
async fn receive(flow: &Flow, params: &HashMap<String, String>) -> Result<Received, (Page, CliError)> {
    let (name, id) = (flow.provider.name, flow.provider.id);
    if let Some(error) = params.get("error") {
        let description =
            params.get("error_description").map(|d| format!(" ({})", printable(d))).unwrap_or_default();
        let message = if error == "access_denied" {
            format!(
                "{name} answered access_denied{description}: the authorization was declined in the \
                 browser; nothing was stored. Run `connectors auth {id}` again and allow the access"
            )
        } else {
            format!(
                "{name} answered with the error {:?}{description} instead of an authorization code; \
                 nothing was stored",
                printable(error)
            )
        };
        let page = Page::new(
            StatusCode::BAD_REQUEST,
            "Authorization not granted",
            format!("{name} did not grant the authorization; nothing was stored. See the terminal."),
        );
        return Err((page, CliError::failed(message)));
    }
    let state = params.get("state").map_or("", String::as_str);
    if let Err(e) = flow.request.check_state(state) {
        let page = Page::new(
            StatusCode::BAD_REQUEST,
            "Authorization rejected",
            "The redirect does not belong to this authorization request (its state differs); nothing \
             was stored. See the terminal.",
        );
        return Err((
            page,
            CliError::failed(format!("{e}; the redirect was rejected and nothing was stored")),
        ));
    }
    let Some(code) = params.get("code").filter(|c| !c.is_empty()) else {
        let page = Page::new(StatusCode::BAD_REQUEST, "Authorization failed", "The redirect has no code.");
        return Err((
            page,
            CliError::failed(format!("the redirect from {name} has no `code`; nothing was stored")),
        ));
    };
    let code = SecretString::from(code.as_str());
    let tokens = oauth::exchange_code(
        &flow.provider,
        &flow.client_id,
        &flow.client_secret,
        &flow.redirect_uri,
        &code,
        flow.request.pkce_verifier.as_ref(),
    )
    .await
    .map_err(|e| {
        let page = Page::new(
            StatusCode::BAD_GATEWAY,
            "Authorization failed",
            format!("The code could not be exchanged for {name} tokens; see the terminal."),
        );
        (page, core_error(e))
    })?;
    let stored = match &flow.store {
        Some(store) => {
            oauth::store_tokens(&flow.provider, &**store, &tokens).await.map_err(|e| {
                let page = Page::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Tokens not stored",
                    "The tokens were received but could not be stored; see the terminal.",
                );
                let message = format!(
                    "the {name} tokens were received but could not be stored: {e}; run `connectors auth {id}` again"
                );
                (page, CliError::failed(message))
            })?;
            true
        }
        None => false,
    };
    let realm_id = params.get("realmId").filter(|_| id == "quickbooks").map(|r| printable(r));
    Ok(Received { tokens, stored, realm_id })
}
