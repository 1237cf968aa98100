fn main() -> std::process::ExitCode {
    walfs::cli::main()
}
