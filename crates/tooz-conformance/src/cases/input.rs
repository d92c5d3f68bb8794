//! Bad input gets a clear, typed error that names the offending value, never a
//! panic: empty and oversized ids, unknown schemes, malformed URLs, unknown options
//! and bad option values, missing characteristics (tooz `ToozDriverChosenPoorly`),
//! and an unreachable backend (tooz `test_connection_error_bad_host`).

use tooz_core::{Characteristic, ConnectOptions, Url};

use super::prelude::*;

const TOO_LONG: usize = tooz_core::ids::MAX_ID_LEN + 1;

pub(crate) async fn empty_group_id_is_invalid_id(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    expect_err!(
        c.create_group("").await,
        ToozError::InvalidId { .. },
        "create_group(\"\")"
    );
    expect_err!(
        c.join_group("", &()).await,
        ToozError::InvalidId { .. },
        "join_group(\"\")"
    );
    expect_err!(
        c.get_members("").await,
        ToozError::InvalidId { .. },
        "get_members(\"\")"
    );
    expect_err!(
        c.events("").await,
        ToozError::InvalidId { .. },
        "events(\"\")"
    );
    Ok(())
}

pub(crate) async fn empty_member_id_is_invalid_id(h: &Harness) -> CaseResult {
    expect_err!(
        h.registry().connect_with(h.url(), "", &h.connect_options()),
        ToozError::InvalidId { kind, .. } if kind == "member id",
        "connect with an empty member id"
    );
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    expect_err!(
        c.get_member_capabilities(&g, "").await,
        ToozError::InvalidId { .. },
        "get_member_capabilities of an empty member id"
    );
    Ok(())
}

pub(crate) async fn empty_lock_name_is_invalid_id(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    expect_err!(
        c.get_lock(""),
        ToozError::InvalidId { kind, .. } if kind == "lock name",
        "get_lock(\"\")"
    );
    Ok(())
}

pub(crate) async fn oversized_ids_are_invalid_id(h: &Harness) -> CaseResult {
    let long = "x".repeat(TOO_LONG);
    let c = h.started(h.member("a")).await?;
    expect_err!(
        c.create_group(long.as_str()).await,
        ToozError::InvalidId { kind, .. } if kind == "group id",
        "create_group with a {TOO_LONG}-byte id"
    );
    expect_err!(
        c.get_lock(long.as_str()),
        ToozError::InvalidId { kind, .. } if kind == "lock name",
        "get_lock with a {TOO_LONG}-byte name"
    );
    expect_err!(
        h.registry().connect_with(h.url(), long.as_str(), &h.connect_options()),
        ToozError::InvalidId { kind, .. } if kind == "member id",
        "connect with a {TOO_LONG}-byte member id"
    );
    Ok(())
}

pub(crate) async fn unknown_scheme_is_invalid_url(h: &Harness) -> CaseResult {
    let scheme = "nosuchtoozdriver";
    expect_err!(
        h.registry().connect(&format!("{scheme}://127.0.0.1:1/x"), h.member("a")),
        ToozError::InvalidUrl { ref url, ref reason } if url.contains(scheme) || reason.contains(scheme),
        "connect with an unknown scheme (the error must name it)"
    );
    Ok(())
}

pub(crate) async fn malformed_url_is_invalid_url(h: &Harness) -> CaseResult {
    for bad in ["not a url", "://nohost", "redis://[::1"] {
        expect_err!(
            h.registry().connect(bad, h.member("a")),
            ToozError::InvalidUrl { .. },
            "connect with the malformed URL {bad:?}"
        );
    }
    Ok(())
}

/// Connects (and starts, where option checks may happen) with `url` and `opts`.
async fn connect_and_start(
    h: &Harness,
    url: &str,
    opts: &ConnectOptions,
) -> tooz_core::Result<Coordinator> {
    let c = h.registry().connect_with(url, h.member("probe"), opts)?;
    c.start(false).await?;
    let _ = c.stop().await;
    Ok(c)
}

pub(crate) async fn unknown_option_is_invalid_option(h: &Harness) -> CaseResult {
    let sep = if h.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}bogus=1", h.url());
    expect_err!(
        connect_and_start(h, &url, &h.connect_options()).await,
        ToozError::InvalidOption { ref option, .. } if option == "bogus",
        "URL option ?bogus=1 (the error must name it)"
    );
    expect_err!(
        connect_and_start(h, h.url(), &h.connect_options().option("bogus", "1")).await,
        ToozError::InvalidOption { ref option, .. } if option == "bogus",
        "explicit option bogus=1"
    );
    Ok(())
}

pub(crate) async fn bad_option_value_is_invalid_option(h: &Harness) -> CaseResult {
    let Some((key, _)) = h
        .options()
        .iter()
        .find(|(_, v)| v.trim().parse::<f64>().is_ok())
    else {
        unsupported!("the setup names no numeric option whose value could be spoiled");
    };
    let opts = h.connect_options().option(key.clone(), "abc");
    expect_err!(
        connect_and_start(h, h.url(), &opts).await,
        ToozError::InvalidOption { ref option, .. } if option == key,
        "option {key}=abc (the error must name {key})"
    );
    Ok(())
}

pub(crate) async fn missing_characteristic_is_driver_chosen_poorly(h: &Harness) -> CaseResult {
    let probe = h.connect(h.member("a")).ctx("connect")?;
    let have = probe.characteristics();
    if let Some(owned) = have.first() {
        h.registry()
            .connect_with(h.url(), h.member("b"), &h.connect_options().require(*owned))
            .ctx("connect requiring a characteristic the driver has")?;
    }
    let Some(missing) = Characteristic::ALL.into_iter().find(|c| !have.contains(c)) else {
        unsupported!("the driver offers every characteristic; none can be missing");
    };
    expect_err!(
        h.registry()
            .connect_with(h.url(), h.member("c"), &h.connect_options().require(missing)),
        ToozError::DriverChosenPoorly { missing: ref m, .. } if m.iter().any(|x| x == missing.as_str()),
        "connect requiring {missing}, which the driver lacks"
    );
    Ok(())
}

pub(crate) async fn unreachable_backend_is_connection_error(h: &Harness) -> CaseResult {
    let mut url = Url::parse(h.url())
        .map_err(|e| CaseError::Failed(format!("the setup URL does not parse: {e}")))?;
    if url.host_str().is_some_and(|s| !s.is_empty()) {
        url.set_host(Some("127.0.0.1"))
            .map_err(|e| CaseError::Failed(format!("rewriting the host: {e}")))?;
        url.set_port(Some(1))
            .map_err(|()| CaseError::Failed("rewriting the port".into()))?;
    } else if url.path().len() > 1 {
        url.set_path(&format!(
            "/proc/tooz-conformance-unreachable/{}",
            h.namespace()
        ));
    } else {
        unsupported!("cannot derive an unreachable URL from {}", h.url());
    }
    let c = h
        .registry()
        .connect_with(url.as_str(), h.member("a"), &h.connect_options())
        .ctx("connect (no I/O yet)")?;
    let r = tokio::time::timeout(Duration::from_secs(40), c.start(false))
        .await
        .ctx("start against an unreachable backend")?;
    expect_err!(
        r,
        ToozError::Connection { .. } | ToozError::OperationTimedOut(_),
        "start against {url}"
    );
    Ok(())
}
