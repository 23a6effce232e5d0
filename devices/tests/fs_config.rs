//! virtio-fs configuration checks through the public API: every unusable
//! value is refused before anything is served, with a message that names it.

mod fs_support;

mod virtio_fs {
    use husk_devices::fs::{CachePolicy, ConfigError, FsConfig, FsError, VirtioFs};

    use super::fs_support::TestDir;

    fn config_error(config: FsConfig) -> ConfigError {
        match VirtioFs::new(config) {
            Err(FsError::Config(error)) => error,
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("expected a configuration error, the device was built"),
        }
    }

    #[test]
    fn fs_config_rejects_an_empty_tag() {
        let dir = TestDir::new("cfg-empty").unwrap();
        let mut config = FsConfig::new(dir.path());
        config.tag = String::new();
        assert!(matches!(config_error(config), ConfigError::EmptyTag));
    }

    #[test]
    fn fs_config_rejects_a_tag_longer_than_36_bytes_and_names_it() {
        let dir = TestDir::new("cfg-long").unwrap();
        let mut config = FsConfig::new(dir.path());
        // 18 two-byte characters plus one: 37 bytes in 19 characters.
        config.tag = format!("{}x", "é".repeat(18));
        let error = config_error(config.clone());
        assert!(
            matches!(error, ConfigError::TagTooLong { len: 37, .. }),
            "{error}"
        );
        assert!(error.to_string().contains(&config.tag), "{error}");
        config.tag = "é".repeat(18);
        VirtioFs::new(config).unwrap();
    }

    #[test]
    fn fs_config_rejects_a_tag_with_a_nul_byte() {
        let dir = TestDir::new("cfg-nul").unwrap();
        let mut config = FsConfig::new(dir.path());
        config.tag = "kata\0Shared".to_owned();
        assert!(matches!(
            config_error(config),
            ConfigError::TagHasNul { .. }
        ));
    }

    #[test]
    fn fs_config_rejects_an_unknown_cache_policy_and_names_the_value() {
        let error = "sometimes".parse::<CachePolicy>().unwrap_err();
        assert!(matches!(&error, ConfigError::CachePolicy { value } if value == "sometimes"));
        assert!(error.to_string().contains("\"sometimes\""), "{error}");
        assert!(
            "Always".parse::<CachePolicy>().is_err(),
            "names are lower case, as in the shim's file"
        );
        assert_eq!(
            "metadata".parse::<CachePolicy>().unwrap(),
            CachePolicy::Metadata
        );
        assert_eq!("never".parse::<CachePolicy>().unwrap(), CachePolicy::Never);
    }

    #[test]
    fn fs_config_rejects_zero_and_too_many_request_queues() {
        let dir = TestDir::new("cfg-queues").unwrap();
        let mut config = FsConfig::new(dir.path());
        config.num_request_queues = 0;
        assert!(matches!(
            config_error(config.clone()),
            ConfigError::NoRequestQueues
        ));
        config.num_request_queues = 17;
        let error = config_error(config.clone());
        assert!(
            matches!(error, ConfigError::TooManyRequestQueues { requested: 17 }),
            "{error}"
        );
        config.num_request_queues = 16;
        VirtioFs::new(config).unwrap();
    }

    #[test]
    fn fs_config_rejects_a_missing_or_non_directory_shared_dir_and_names_it() {
        let dir = TestDir::new("cfg-dir").unwrap();
        let missing = dir.path().join("missing");
        let error = config_error(FsConfig::new(&missing));
        assert!(matches!(error, ConfigError::SharedDir { .. }), "{error}");
        assert!(
            error.to_string().contains(missing.to_str().unwrap()),
            "{error}"
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"not a directory").unwrap();
        let error = config_error(FsConfig::new(&file));
        assert!(
            matches!(error, ConfigError::SharedDirNotDirectory { .. }),
            "{error}"
        );
    }

    #[test]
    fn fs_config_resolves_a_symlinked_shared_dir_to_its_target() {
        let dir = TestDir::new("cfg-link").unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let config = FsConfig::new(dir.path().join("link"));
        assert_eq!(
            config.resolved_shared_dir().unwrap(),
            dir.path().join("real").canonicalize().unwrap()
        );
    }
}
