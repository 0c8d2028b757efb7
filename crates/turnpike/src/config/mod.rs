//! `turnpike serve`'s configuration: [`Options`] (command line and TOML
//! file, each option declared once), the [`HostFacts`] read before
//! validation, and [`validate`], the pure step from both to the
//! [`Settings`] the server runs with.

mod host;
mod options;
mod parse;
mod types;
mod validate;

pub use host::HostFacts;
pub use options::{CommandLine, Options};
pub(crate) use parse::parse_cidrs;
pub use parse::{parse_md5_hex, parse_socket_addr};
pub use types::{FastPathMode, HostPort, LogFormat, PeerPrecedence, Period, Secret, UserSpec};
pub use validate::{validate, Settings, TlsSource, WebSettings};

impl Settings {
    /// Validates `options` against this host as it is now.
    pub fn from_options(options: &Options) -> anyhow::Result<Settings> {
        validate(options, &HostFacts::read(options))
    }
}
