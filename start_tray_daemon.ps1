<#
.SYNOPSIS
    Luna Daemon launcher for Windows (PowerShell): set up once, then start the tray hidden.

.DESCRIPTION
    Finds Python in this order:
      1. %LUNA_PYTHON% (used as it is)
      2. ComfyUI portable's embedded Python when this checkout is in
         <portable>\ComfyUI\custom_nodes\<this folder> (<portable>\python_embeded\python.exe)
      3. ComfyUI's venv (<ComfyUI>\venv\Scripts\python.exe)
      4. the .venv an earlier run created in this checkout
      5. the Python launcher: py -3
      6. python on PATH (not the Microsoft Store stub)
    A base interpreter (5-6) creates .venv here. Dependencies are installed only when
    missing or when pyproject.toml changed (a stamp file in the environment holds its hash):
    torch first (%LUNA_TORCH_SPEC%, default torch==2.13.0; %LUNA_TORCH_INDEX_URL% for a
    CUDA build, e.g. https://download.pytorch.org/whl/cu128), then pip install -e .
    The tray starts with pythonw.exe via Start-Process -WindowStyle Hidden (no console).

.EXAMPLE
    powershell -NoProfile -ExecutionPolicy Bypass -File start_tray_daemon.ps1 --config D:\luna.toml
#>
# No param() block on purpose: luna-daemon's own options (--config FILE ...) must reach
# Python untouched, and a simple script hands every argument over in $args.
$LunaArgs = @($args)

# 'Continue', not 'Stop': Windows PowerShell 5.1 turns any stderr line of a redirected
# native command (pip and torch warnings) into a terminating error under 'Stop'.
# Failures are checked through exit codes and thrown explicitly.
$ErrorActionPreference = 'Continue'
$Here = $PSScriptRoot
$Venv = Join-Path $Here '.venv'
$TorchSpec = if ($env:LUNA_TORCH_SPEC) { $env:LUNA_TORCH_SPEC } else { 'torch==2.13.0' }

function Say([string]$Text) { Write-Host "luna: $Text" }

function Test-Quiet([string]$Exe, [string[]]$Arguments) {
    # Exit code 0? Output discarded.
    try { & $Exe @Arguments *> $null; return ($LASTEXITCODE -eq 0) } catch { return $false }
}

function Test-Python([string]$Exe, [string[]]$Pre = @()) {
    if (-not $Exe -or -not (Get-Command $Exe -ErrorAction SilentlyContinue)) { return $false }
    return (Test-Quiet $Exe ($Pre + @('-c', 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)')))
}

function Resolve-Exe([string]$Exe, [string[]]$Pre = @()) {
    # The real interpreter path behind a launcher (py.exe) or an alias.
    (& $Exe @Pre -c 'import sys; print(sys.executable)' 2>$null | Select-Object -First 1).Trim()
}

function Find-Python {
    # The order of the issue: LUNA_PYTHON, ComfyUI portable, ComfyUI's venv, then this
    # checkout's own .venv from an earlier run, then py -3 and python (which get a .venv).
    if ($env:LUNA_PYTHON -and (Test-Python $env:LUNA_PYTHON)) {
        return @{ Exe = (Resolve-Exe $env:LUNA_PYTHON); Kind = 'env' }
    }
    $parent = Split-Path -Parent $Here
    if ((Split-Path -Leaf $parent) -ieq 'custom_nodes') {
        $comfy = Split-Path -Parent $parent
        $embedded = Join-Path (Split-Path -Parent $comfy) 'python_embeded\python.exe'
        if (Test-Python $embedded) { return @{ Exe = $embedded; Kind = 'env' } }
        $comfyVenv = Join-Path $comfy 'venv\Scripts\python.exe'
        if (Test-Python $comfyVenv) { return @{ Exe = $comfyVenv; Kind = 'env' } }
    }
    $venvPy = Join-Path $Venv 'Scripts\python.exe'
    if (Test-Python $venvPy) { return @{ Exe = $venvPy; Kind = 'env' } }

    $py = Get-Command py.exe -ErrorAction SilentlyContinue
    if ($py -and (Test-Python $py.Source @('-3'))) {
        return @{ Exe = (Resolve-Exe $py.Source @('-3')); Kind = 'base' }
    }
    foreach ($cmd in @(Get-Command python.exe -All -ErrorAction SilentlyContinue)) {
        if ($cmd.Source -like '*\WindowsApps\*') { continue }  # the Store's install prompt, not Python
        if (Test-Python $cmd.Source) { return @{ Exe = $cmd.Source; Kind = 'base' } }
    }
    return $null
}

function Invoke-Checked([string]$Exe, [string[]]$Arguments, [string]$What) {
    & $Exe @Arguments
    if ($LASTEXITCODE -ne 0) { throw "$What failed (exit code $LASTEXITCODE)" }
}

function Get-Stamp([string]$Exe) {
    # Same one-liner as start_tray_daemon.sh / .bat: sha256(pyproject.toml, torch spec, checkout).
    $code = 'import hashlib,sys;h=hashlib.sha256(open(sys.argv[1],''rb'').read());h.update((''\0''+sys.argv[2]+''\0''+sys.argv[3]).encode());print(h.hexdigest())'
    (& $Exe -c $code (Join-Path $Here 'pyproject.toml') $TorchSpec $Here | Select-Object -First 1).Trim()
}

function Quote-Arg([string]$Arg) {
    # Start-Process joins -ArgumentList with spaces and no quoting (Windows PowerShell 5.1).
    if ($Arg -notmatch '[\s"]') { return $Arg }
    return '"' + ($Arg -replace '(\\*)"', '$1$1\"' -replace '(\\+)$', '$1$1') + '"'
}

try {
    $found = Find-Python
    if (-not $found) {
        throw 'Python 3.10 or newer was not found. Install it from https://www.python.org/downloads/ (tick "Add python.exe to PATH") or set LUNA_PYTHON.'
    }
    $python = $found.Exe
    if ($found.Kind -eq 'base') {
        Say "creating $Venv with $python"
        Invoke-Checked $python @('-m', 'venv', $Venv) 'creating the virtual environment'
        $python = Join-Path $Venv 'Scripts\python.exe'
    }
    Say "using $python"

    $prefix = (& $python -c 'import sys; print(sys.prefix)' | Select-Object -First 1).Trim()
    $stampFile = Join-Path $prefix '.luna-install-stamp'
    $want = Get-Stamp $python
    $have = if (Test-Path $stampFile) { (Get-Content -Raw $stampFile).Trim() } else { '' }
    $importsOk = Test-Quiet $python @('-c', 'import luna_daemon, torch')
    if ($have -ne $want -or -not $importsOk) {
        if (-not (Test-Quiet $python @('-c', 'import torch'))) {
            Say "installing $TorchSpec (first, so the project's torch>=2.1 is already satisfied)"
            $torchArgs = @('-m', 'pip', 'install', '--disable-pip-version-check')
            if ($env:LUNA_TORCH_INDEX_URL) { $torchArgs += @('--extra-index-url', $env:LUNA_TORCH_INDEX_URL) }
            Invoke-Checked $python ($torchArgs + @($TorchSpec)) 'installing torch'
        }
        Say 'installing Luna Daemon (pip install -e .)'
        Invoke-Checked $python @('-m', 'pip', 'install', '--disable-pip-version-check', '-e', $Here) 'installing Luna Daemon'
        Set-Content -Path $stampFile -Value $want -Encoding ascii
    }

    $logFile = (& $python -m luna_daemon logs --path @LunaArgs 2>$null | Select-Object -First 1)
    $pythonw = Join-Path (Split-Path -Parent $python) 'pythonw.exe'
    if (-not (Test-Path $pythonw)) { $pythonw = $python }  # still hidden via -WindowStyle Hidden
    $argList = @(@('-m', 'luna_daemon', 'tray') + $LunaArgs | ForEach-Object { Quote-Arg $_ })
    $logBefore = if ($logFile -and (Test-Path $logFile)) { (Get-Item $logFile).Length } else { 0 }
    $proc = Start-Process -FilePath $pythonw -ArgumentList $argList -WorkingDirectory $Here `
        -WindowStyle Hidden -PassThru -ErrorAction Stop
    # A second launch is refused within seconds (exit code 1) and the running tray shows a
    # notification. Wait for either that or this launch's "tray icon shown" log line.
    for ($i = 0; $i -lt 50; $i++) {
        if ($proc.HasExited) {
            if ($proc.ExitCode -eq 1) { Say 'Luna Daemon is already running! (its tray icon shows the status)'; exit 1 }
            if ($proc.ExitCode -ne 0) { throw "the tray exited with code $($proc.ExitCode); see the log: $logFile" }
            exit 0
        }
        if ($logFile -and (Test-Path $logFile) -and (Get-Item $logFile).Length -gt $logBefore) {
            $fs = [System.IO.File]::Open($logFile, 'Open', 'Read', 'ReadWrite')
            try {
                [void]$fs.Seek($logBefore, 'Begin')
                $new = (New-Object System.IO.StreamReader($fs)).ReadToEnd()
            } finally { $fs.Dispose() }
            if ($new -match 'tray icon shown|running the daemon headless') { break }
        }
        Start-Sleep -Milliseconds 200
    }
    Say "Luna Daemon started in the system tray (pid $($proc.Id))"
    Say "logs: $logFile"
    exit 0
} catch {
    Write-Host "luna: error: $($_.Exception.Message)" -ForegroundColor Red
    exit 1
}
