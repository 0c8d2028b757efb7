//! The log subscriber: text or JSON lines on stderr, with a level that a
//! reload can change.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::Settings;

/// The log filter's reload handle (SIGHUP changes the level live).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Log output that never fails. If stderr goes away (a closed pipe, a
/// restarted log collector), tracing-subscriber reports the failed write
/// with `eprintln!`, which panics on the same broken stderr, and that would
/// kill a worker or the signal thread. Lost log lines are better.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the process's subscriber (once; later calls change nothing).
pub(super) fn init(settings: &Settings) {
    // The filter sits behind a reload handle so SIGHUP can change the level.
    let (filter, handle) = tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(
        &settings.options.log_level,
    ));
    if LOG_FILTER.set(handle).is_err() {
        return;
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(|| LossyStderr);
    if settings.options.log_format == crate::config::LogFormat::Json {
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true))
            .try_init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt.with_ansi(ansi))
            .try_init();
    }
}

/// Applies a reloaded log level.
pub(super) fn set_level(level: &str) {
    if let Some(h) = LOG_FILTER.get() {
        if let Err(e) = h.reload(tracing_subscriber::EnvFilter::new(level)) {
            tracing::warn!(error = %e, "cannot change the log level");
        }
    }
}
