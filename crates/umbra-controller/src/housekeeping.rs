//! Retention: what the store forgets as it ages, so that a deployment that runs for years
//! keeps a store, and listings, of bounded size.
//!
//! - Audit records stored more than `audit_retention_days` ago, by the controller's clock
//!   (0: kept for ever). A broker's records also carry the broker's time, which may be wrong:
//!   by that one, a host whose clock says 1970 would lose them at once. Allowed streams are
//!   recorded one by one, so this is what grows fastest: a busy deployment adds gigabytes a
//!   month.
//! - Enrollment tokens used or expired more than [`TOKEN_RETENTION`] ago (their use stays in
//!   the audit log).
//!
//! Certificates are forgotten by the renewals that replace them (`enroll.rs`). A sweep runs at
//! start and then every [`SWEEP_EVERY`], deleting a batch per write transaction so that
//! enrollments and admin writes are never kept waiting long; what it deleted is an audit
//! record of its own.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::audit;
use crate::state::Ctx;
use crate::store::peers;

/// How long used or expired enrollment tokens are kept.
pub(crate) const TOKEN_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Time between two sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
/// Audit records deleted per write transaction.
const BATCH: i64 = 5_000;

/// What one sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Audit records.
    pub audit: u64,
    /// Enrollment tokens.
    pub tokens: u64,
}

/// The cut-off times of a sweep at `now_ms`: audit records made before the first (none when
/// retention is 0), tokens used or expired before the second (Unix seconds). Pure.
fn cutoffs(now_ms: i64, audit_retention: Duration) -> (Option<i64>, i64) {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    let audit = (!audit_retention.is_zero()).then(|| now_ms.saturating_sub(ms(audit_retention)));
    let tokens = now_ms.saturating_sub(ms(TOKEN_RETENTION)) / 1000;
    (audit, tokens)
}

/// One sweep at the controller's `now`. Each batch of audit records is deleted in the same
/// transaction as the `retention.sweep` record that says so (the last batch also deletes the
/// aged tokens): a sweep cut short by a crash or an error leaves no deletion unrecorded.
pub(crate) async fn sweep(ctx: &Ctx, audit_retention: Duration) -> Result<Swept, sqlx::Error> {
    let now = ctx.now();
    let now_ms = i64::try_from(audit::unix_ms(now)).unwrap_or(i64::MAX);
    let (audit_before, tokens_before) = cutoffs(now_ms, audit_retention);
    let mut swept = Swept::default();
    loop {
        let mut w = ctx.store.write().await?;
        let n = match audit_before {
            Some(before) => peers::audit_forget_before(w.conn(), &ctx.org, before, BATCH).await?,
            None => 0,
        };
        let last = n < BATCH as u64;
        let tokens = if last {
            peers::tokens_forget_before(w.conn(), &ctx.org, tokens_before).await?
        } else {
            0
        };
        swept.audit += n;
        swept.tokens += tokens;
        if n == 0 && tokens == 0 {
            // Nothing deleted in this transaction, nothing to record.
            return Ok(swept);
        }
        let rec = audit::record(
            now,
            audit::CONTROLLER,
            "retention.sweep",
            &ctx.org,
            true,
            serde_json::json!({
                "audit_deleted": n,
                "audit_before_ms": audit_before,
                "tokens_deleted": tokens,
                "tokens_before": tokens_before,
            }),
        );
        audit::commit(w, &ctx.org, std::slice::from_ref(&rec)).await?;
        if last {
            return Ok(swept);
        }
        // Let waiting writers in between two batches.
        tokio::task::yield_now().await;
    }
}

/// Sweeps at start and every [`SWEEP_EVERY`] until shutdown.
pub(crate) async fn sweep_loop(
    ctx: Arc<Ctx>,
    audit_retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        match sweep(&ctx, audit_retention).await {
            Ok(s) if s != Swept::default() => tracing::info!(
                audit_deleted = s.audit,
                tokens_deleted = s.tokens,
                "retention sweep"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "retention sweep failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            r = shutdown.changed() => if r.is_err() || *shutdown.borrow() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoffs_follow_the_settings() {
        let day = 86_400_000_i64;
        let now = 400 * day;
        let (audit, tokens) = cutoffs(now, Duration::from_secs(365 * 86_400));
        assert_eq!(audit, Some(35 * day));
        assert_eq!(tokens, (370 * day) / 1000);
        // Retention 0 keeps every record; tokens go all the same.
        assert_eq!(cutoffs(now, Duration::ZERO).0, None);
        // Early clocks do not wrap.
        assert_eq!(
            cutoffs(0, Duration::from_secs(86_400)),
            (Some(-day), -30 * 86_400)
        );
    }
}
