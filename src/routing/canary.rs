//! A canary: a second upstream that takes a share of a service's clients,
//! each client kept on its colour by a cookie (as kamal-proxy does), so
//! one user does not flip between versions from one request to the next.
//!
//! The choice is made per request by [`Canary::choose`], a pure function
//! of the request's cookies and one random draw: a request that names a
//! colour still serving (active or canary) goes there; any other (no
//! cookie, or a cookie for a colour that is gone) is assigned by the share
//! and gets the cookie on its response. A service without a canary pays
//! one `Option` check for all this.
//!
//! The cookie's value names the upstream, not only its colour: the
//! colour plus the container's deploy id. After a promote and a later
//! canary of the same colour, an old cookie then names nothing and its
//! client is assigned afresh instead of landing on the new canary.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use http::header::HeaderValue;

use crate::upstream::Upstream;

/// Shares are in basis points: 10_000 is everything.
pub const FULL_SHARE: u32 = 10_000;

/// A service's canary, as the snapshot holds it.
#[derive(Debug)]
pub struct Canary {
    /// The new colour.
    pub upstream: Arc<Upstream>,
    /// Share of newly assigned clients sent to it, in basis points.
    pub share_bp: u32,
    /// `cutover_<service>`.
    cookie: String,
    /// Cookie values naming the active upstream and the canary.
    active_token: String,
    canary_token: String,
    /// Ready `Set-Cookie` values, built once.
    set_active: HeaderValue,
    set_canary: HeaderValue,
}

/// Where one request goes, and whether it was assigned (then its response
/// sets the cookie, see [`Canary::set_cookie`]) rather than sent where its
/// cookie named. A flag, not the header value: it is held across the
/// upstream exchange, inside every request's future.
#[derive(Debug)]
pub struct Choice {
    pub upstream: Arc<Upstream>,
    pub assigned: Option<Assigned>,
}

/// The colour a request was assigned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigned {
    Active,
    Canary,
}

impl Canary {
    /// A canary of `service` on `upstream` beside `active`, taking
    /// `share_bp` basis points of new clients.
    pub fn new(
        service: &str,
        active: &Upstream,
        upstream: Arc<Upstream>,
        share_bp: u32,
    ) -> Arc<Canary> {
        let cookie = cookie_name(service);
        let active_token = sticky_token(active);
        let canary_token = sticky_token(&upstream);
        let set = |token: &str| {
            HeaderValue::from_str(&format!("{cookie}={token}; Path=/; HttpOnly; SameSite=Lax"))
                .unwrap_or(HeaderValue::from_static(""))
        };
        Arc::new(Canary {
            set_active: set(&active_token),
            set_canary: set(&canary_token),
            upstream,
            share_bp: share_bp.min(FULL_SHARE),
            cookie,
            active_token,
            canary_token,
        })
    }

    /// The cookie's name.
    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    /// The `Set-Cookie` value for a request assigned to `to`.
    pub fn set_cookie(&self, to: Assigned) -> HeaderValue {
        match to {
            Assigned::Active => self.set_active.clone(),
            Assigned::Canary => self.set_canary.clone(),
        }
    }

    /// The upstream for a request with these `Cookie` header values, given
    /// the service's `active` upstream and one random draw.
    pub fn choose<'a>(
        &self,
        active: &Arc<Upstream>,
        cookies: impl Iterator<Item = &'a HeaderValue>,
        draw: u32,
    ) -> Choice {
        match self.named(cookies) {
            Some(Named::Active) => Choice {
                upstream: Arc::clone(active),
                assigned: None,
            },
            Some(Named::Canary) => Choice {
                upstream: Arc::clone(&self.upstream),
                assigned: None,
            },
            None if draw % FULL_SHARE < self.share_bp => Choice {
                upstream: Arc::clone(&self.upstream),
                assigned: Some(Assigned::Canary),
            },
            None => Choice {
                upstream: Arc::clone(active),
                assigned: Some(Assigned::Active),
            },
        }
    }

    /// Which serving upstream the request's cookie names, if any.
    fn named<'a>(&self, cookies: impl Iterator<Item = &'a HeaderValue>) -> Option<Named> {
        for header in cookies {
            for pair in header.as_bytes().split(|b| *b == b';') {
                let pair = pair.trim_ascii();
                let Some(value) = pair
                    .strip_prefix(self.cookie.as_bytes())
                    .and_then(|rest| rest.strip_prefix(b"="))
                else {
                    continue;
                };
                if value == self.canary_token.as_bytes() {
                    return Some(Named::Canary);
                }
                if value == self.active_token.as_bytes() {
                    return Some(Named::Active);
                }
            }
        }
        None
    }
}

enum Named {
    Active,
    Canary,
}

/// The sticky cookie's name for `service` (service names are letters,
/// digits, `-` and `_`: valid cookie-name characters).
pub fn cookie_name(service: &str) -> String {
    format!("cutover_{service}")
}

/// The cookie value naming `upstream`: its colour, plus its deploy id when
/// a container serves it.
pub fn sticky_token(upstream: &Upstream) -> String {
    match &upstream.container {
        Some(container) => format!("{}-{}", upstream.label, container.deploy_id),
        None => upstream.label.clone(),
    }
}

thread_local! {
    /// xorshift64* state, seeded per thread from the standard library's
    /// random hasher keys.
    static RNG: Cell<u64> = Cell::new(
        std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
    );
}

/// A cheap uniform draw for assigning clients (not for anything secret).
pub fn draw() -> u32 {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::upstream::ContainerState;

    fn upstream(label: &str, deploy: &str, port: u16) -> Arc<Upstream> {
        Upstream::for_container(
            format!("127.0.0.1:{port}").parse().expect("addr"),
            label,
            ContainerState {
                id: format!("id-{deploy}"),
                image: format!("web:{deploy}"),
                deploy_id: deploy.into(),
            },
            &Limits::default(),
        )
    }

    #[test]
    fn cookie_keeps_a_client_and_others_are_assigned_by_share() {
        let blue = upstream("blue", "d1", 9001);
        let green = upstream("green", "d2", 9002);
        let canary = Canary::new("web", &blue, Arc::clone(&green), 1_000);
        let none: [HeaderValue; 0] = [];
        // No cookie: draws below the share go to the canary, with a cookie.
        let picked = canary.choose(&blue, none.iter(), 999);
        assert!(Arc::ptr_eq(&picked.upstream, &green));
        assert_eq!(picked.assigned, Some(Assigned::Canary));
        assert_eq!(
            canary.set_cookie(Assigned::Canary).to_str().unwrap_or(""),
            "cutover_web=green-d2; Path=/; HttpOnly; SameSite=Lax"
        );
        let picked = canary.choose(&blue, none.iter(), 1_000);
        assert!(Arc::ptr_eq(&picked.upstream, &blue));
        assert_eq!(picked.assigned, Some(Assigned::Active));
        // A cookie naming a serving colour wins over any draw.
        let cookies = [HeaderValue::from_static("a=1; cutover_web=green-d2; b=2")];
        let picked = canary.choose(&blue, cookies.iter(), 9_999);
        assert!(Arc::ptr_eq(&picked.upstream, &green) && picked.assigned.is_none());
        let cookies = [
            HeaderValue::from_static("x=y"),
            HeaderValue::from_static("cutover_web=blue-d1"),
        ];
        let picked = canary.choose(&blue, cookies.iter(), 0);
        assert!(Arc::ptr_eq(&picked.upstream, &blue) && picked.assigned.is_none());
        // A colour that is gone (an older deploy of green), or another
        // service's cookie: reassigned.
        for stale in ["cutover_web=green-d0", "cutover_webx=green-d2"] {
            let cookies = [HeaderValue::from_static(stale)];
            let picked = canary.choose(&blue, cookies.iter(), 5_000);
            assert!(Arc::ptr_eq(&picked.upstream, &blue), "{stale}");
            assert!(picked.assigned.is_some(), "{stale}");
        }
    }

    #[test]
    fn draws_spread_evenly() {
        let draws = 100_000;
        let below = (0..draws).filter(|_| draw() % FULL_SHARE < 1_000).count();
        let share = below as f64 / draws as f64;
        assert!((share - 0.10).abs() < 0.01, "{share}");
    }
}
