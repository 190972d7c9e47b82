//! How the data travels to Glance: PUT, or stage then import, chosen from what was asked and what
//! the cloud offers.

use anyhow::{bail, Result};

use super::ImportMethod;
use crate::openstack::glance::Offer;

/// How the data will travel.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// PUT, into `store` or the default one.
    Put { store: Option<String> },
    /// Stage, then import into `stores` (the default one when empty); `fallback`: PUT instead when
    /// Glance refuses the staging.
    GlanceDirect { stores: Vec<String>, fallback: bool },
}

impl Route {
    pub(super) fn method(&self) -> &'static str {
        match self {
            Route::Put { .. } => "put",
            Route::GlanceDirect { .. } => "glance-direct",
        }
    }

    pub(super) fn stores(&self) -> Vec<String> {
        match self {
            Route::Put { store } => store.iter().cloned().collect(),
            Route::GlanceDirect { stores, .. } => stores.clone(),
        }
    }
}

/// Chooses how the data travels from what was asked and what the cloud offers.
pub fn choose_route(method: ImportMethod, stores: &[String], offer: &Offer) -> Result<Route> {
    if !stores.is_empty() && offer.stores.is_empty() {
        bail!("--stores: this cloud has a single store (GET /v2/info/stores lists none); leave --stores out");
    }
    if let Some(unknown) = stores.iter().find(|s| !offer.stores.contains(s)) {
        bail!("--stores: the cloud has no store `{unknown}` (its stores: {})", offer.stores.join(", "));
    }
    let direct = offer.import_methods.iter().any(|m| m == "glance-direct");
    let one_store = || match stores {
        [] => Ok(None),
        [one] => Ok(Some(one.clone())),
        _ => bail!("PUT stores the data in one store; several (--stores) need the glance-direct import"),
    };
    Ok(match method {
        ImportMethod::Put => Route::Put { store: one_store()? },
        ImportMethod::GlanceDirect if !direct => bail!(
            "the cloud does not offer the glance-direct import (GET /v2/info/import offers: {}); use --import-method put",
            if offer.import_methods.is_empty() { "nothing".to_string() } else { offer.import_methods.join(", ") }
        ),
        ImportMethod::GlanceDirect => Route::GlanceDirect { stores: stores.to_vec(), fallback: false },
        ImportMethod::Auto if direct => Route::GlanceDirect { stores: stores.to_vec(), fallback: stores.len() < 2 },
        ImportMethod::Auto => Route::Put { store: one_store()? },
    })
}

/// Whether a staging answer is Glance refusing the glance-direct route (by policy, configuration or
/// staging quota) rather than the data: PUT may still be allowed.
pub(super) fn staging_refused(status: u16) -> bool {
    matches!(status, 403 | 404 | 405 | 413 | 501)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(methods: &[&str], stores: &[&str]) -> Offer {
        Offer {
            import_methods: methods.iter().map(|s| s.to_string()).collect(),
            stores: stores.iter().map(|s| s.to_string()).collect(),
            default_store: stores.first().map(|s| s.to_string()),
        }
    }

    #[test]
    fn the_route_follows_the_method_and_what_the_cloud_offers() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let full = offer(&["glance-direct", "web-download"], &["fs", "fs2"]);
        let put_only = offer(&[], &[]);
        assert_eq!(
            choose_route(ImportMethod::Auto, &[], &full).unwrap(),
            Route::GlanceDirect { stores: vec![], fallback: true }
        );
        assert_eq!(choose_route(ImportMethod::Auto, &[], &put_only).unwrap(), Route::Put { store: None });
        assert_eq!(choose_route(ImportMethod::Put, &[], &full).unwrap(), Route::Put { store: None });
        assert_eq!(
            choose_route(ImportMethod::Put, &strings(&["fs2"]), &full).unwrap(),
            Route::Put { store: Some("fs2".into()) }
        );
        assert_eq!(
            choose_route(ImportMethod::Auto, &strings(&["fs", "fs2"]), &full).unwrap(),
            Route::GlanceDirect { stores: strings(&["fs", "fs2"]), fallback: false },
            "PUT cannot reach two stores, so no fallback"
        );
        let err = |m, stores: &[&str], o: &Offer| format!("{:#}", choose_route(m, &strings(stores), o).unwrap_err());
        assert!(err(ImportMethod::GlanceDirect, &[], &put_only).contains("offers: nothing"));
        assert!(err(ImportMethod::Put, &["fs", "fs2"], &full).contains("one store"));
        assert!(err(ImportMethod::Auto, &["nope"], &full).contains("no store `nope` (its stores: fs, fs2)"));
        assert!(err(ImportMethod::Auto, &["fs"], &put_only).contains("single store"));
        assert!(staging_refused(403) && staging_refused(404) && !staging_refused(500) && !staging_refused(409));
    }
}
