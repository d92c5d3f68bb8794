//! Choosing a driver by URL scheme, as Python tooz's `get_coordinator` does.
//!
//! Registration is explicit: each driver crate exports a [`DriverDescriptor`]
//! constant and the application (or the `tooz` facade) registers the ones it uses.

use std::fmt;
use std::sync::Arc;

use url::Url;

use crate::characteristic::Characteristic;
use crate::coordinator::{Coordinator, CoordinatorConfig};
use crate::driver::Driver;
use crate::error::{Result, ToozError};
use crate::features::Features;
use crate::ids::MemberId;
use crate::lease::LeasePolicy;
use crate::options::{Options, parse_backend_url, redact_url, redact_url_str};

/// What a driver factory receives.
#[derive(Debug)]
#[non_exhaustive]
pub struct ConnectRequest<'a> {
    /// The parsed backend URL.
    pub url: &'a Url,
    /// The member id of the coordinator being built.
    pub member_id: &'a MemberId,
    /// URL query options overridden by explicit ones.
    pub options: &'a Options,
}

/// Builds a driver from a URL.
pub type ConnectFn = fn(&ConnectRequest<'_>) -> Result<Arc<dyn Driver>>;

/// A driver's entry in a [`Registry`].
#[derive(Clone, Copy)]
pub struct DriverDescriptor {
    /// Driver name.
    pub name: &'static str,
    /// URL schemes it serves (`["redis"]`, `["zookeeper", "kazoo"]`).
    pub schemes: &'static [&'static str],
    /// The factory.
    pub connect: ConnectFn,
    /// What the driver can do (see [`crate::features`]).
    pub features: Features,
}

impl fmt::Debug for DriverDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DriverDescriptor")
            .field("name", &self.name)
            .field("schemes", &self.schemes)
            .field("features", &self.features)
            .finish()
    }
}

/// Explicit options for [`Registry::connect_with`].
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Options that replace URL query options of the same name (tooz's kwargs).
    pub options: Vec<(String, String)>,
    /// Characteristics the driver must offer (else `DriverChosenPoorly`).
    pub characteristics: Vec<Characteristic>,
    /// Tuning of the coordinator.
    pub config: CoordinatorConfig,
}

impl ConnectOptions {
    /// Empty options.
    pub fn new() -> Self {
        ConnectOptions::default()
    }

    /// Adds an option overriding the URL's.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.options.push((key.into(), value.into()));
        self
    }

    /// Requires a characteristic.
    pub fn require(mut self, c: Characteristic) -> Self {
        self.characteristics.push(c);
        self
    }

    /// Sets the coordinator tuning.
    pub fn config(mut self, config: CoordinatorConfig) -> Self {
        self.config = config;
        self
    }
}

/// The drivers an application can connect to, keyed by URL scheme.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    drivers: Vec<DriverDescriptor>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers a driver; a later registration of a scheme replaces an earlier one.
    pub fn register(&mut self, driver: DriverDescriptor) -> &mut Self {
        self.drivers
            .retain(|d| !d.schemes.iter().any(|s| driver.schemes.contains(s)));
        self.drivers.push(driver);
        self
    }

    /// Builder form of [`Registry::register`].
    pub fn with(mut self, driver: DriverDescriptor) -> Self {
        self.register(driver);
        self
    }

    /// Every registered scheme.
    pub fn schemes(&self) -> Vec<&'static str> {
        self.drivers
            .iter()
            .flat_map(|d| d.schemes.iter().copied())
            .collect()
    }

    /// Every registered driver.
    pub fn drivers(&self) -> &[DriverDescriptor] {
        &self.drivers
    }

    /// The driver serving `url`'s scheme, if registered.
    pub fn driver_for(&self, url: &str) -> Option<&DriverDescriptor> {
        let scheme = url.split_once("://").map(|(s, _)| s)?;
        self.drivers.iter().find(|d| d.schemes.contains(&scheme))
    }

    /// Builds an unstarted coordinator for `url` and `member_id`.
    ///
    /// # Errors
    /// `InvalidUrl` (malformed, or no driver for the scheme), `InvalidOption`,
    /// `InvalidId` (bad member id).
    pub fn connect(&self, url: &str, member_id: impl Into<MemberId>) -> Result<Coordinator> {
        self.connect_with(url, member_id, &ConnectOptions::default())
    }

    /// Like [`Registry::connect`] with explicit options and required characteristics.
    ///
    /// # Errors
    /// As [`Registry::connect`], plus `DriverChosenPoorly`.
    pub fn connect_with(
        &self,
        url: &str,
        member_id: impl Into<MemberId>,
        opts: &ConnectOptions,
    ) -> Result<Coordinator> {
        let member_id = member_id.into();
        member_id.validate()?;
        let parsed =
            parse_backend_url(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
        let scheme = parsed.scheme();
        let Some(d) = self.drivers.iter().find(|d| d.schemes.contains(&scheme)) else {
            let mut known = self.schemes();
            known.sort_unstable();
            return Err(ToozError::invalid_url(
                redact_url(&parsed),
                format!(
                    "no driver for scheme {scheme:?}; registered schemes: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let mut options = Options::from_url(&parsed);
        for (k, v) in &opts.options {
            options.set(k.clone(), v.clone());
        }
        let config = core_options(&mut options, d.name, opts.config.clone())?;
        let driver = (d.connect)(&ConnectRequest {
            url: &parsed,
            member_id: &member_id,
            options: &options,
        })?;
        driver.check_id(crate::driver::IdRef::Member(&member_id))?;
        let info = driver.info();
        let missing: Vec<Characteristic> = opts
            .characteristics
            .iter()
            .copied()
            .filter(|c| !info.characteristics.contains(c))
            .collect();
        if !missing.is_empty() {
            let names = |v: &[Characteristic]| v.iter().map(|c| c.as_str().to_string()).collect();
            return Err(ToozError::DriverChosenPoorly {
                driver: info.name.to_string(),
                desired: names(&opts.characteristics),
                available: names(info.characteristics),
                missing: names(&missing),
            });
        }
        Ok(Coordinator::with_config(
            driver,
            member_id,
            redact_url(&parsed),
            config,
        ))
    }
}

/// The options every driver accepts, read (and removed) by the core:
/// `loss_margin` (seconds, `0` allowed) and `lease_policy`
/// (`standard`/`at_risk_is_lost`); see [`crate::lease`].
fn core_options(
    options: &mut Options,
    driver: &str,
    mut config: CoordinatorConfig,
) -> Result<CoordinatorConfig> {
    if options.contains("loss_margin") {
        let secs = options.parse::<f64>(driver, "loss_margin", "a number of seconds")?;
        match secs {
            Some(v) if v.is_finite() && (0.0..=1e9).contains(&v) => {
                config.loss_margin = Some(std::time::Duration::from_secs_f64(v));
            }
            Some(v) => {
                return Err(ToozError::invalid_option(
                    driver,
                    "loss_margin",
                    format!("expected a number of seconds of 0 or more, got {v}"),
                ));
            }
            None => {}
        }
        options.remove("loss_margin");
    }
    if options.contains("lease_policy") {
        if let Some(p) = options.parse::<LeasePolicy>(driver, "lease_policy", "a lease policy")? {
            config.lease_policy = p;
        }
        options.remove("lease_policy");
    }
    Ok(config)
}
